"""The tuning space: target knobs a spec leaves open, filtered to what spec validation accepts.

Every knob here changes only the speed, never the result (docs/semantics.md), so any candidate that
validates is a legal replacement for the spec's own target. A spec's fixed choices that are not in the
grid (archs, carriers) are kept as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from swrgen import constants
from swrgen.spec import Spec, SpecError

# Knob -> values tried by default. tiles_in_flight is further limited by the register budget of the
# spec's block_len, cluster_size > 1 by the arch (clusters need sm_90+), staging "shared" by the shared
# memory of the spec's archs, all through spec validation.
DEFAULT_GRID: dict[str, tuple[Any, ...]] = {
    "warps_per_cta": (2, 4, 8),
    "tiles_per_warp": (32, 64, 128, 256),
    "tiles_in_flight": (1, 2, 4, 8),  # 16 (shared staging only) measured slower: bench/RESULTS.md run 41
    "cluster_size": (1, 2),
    "persistent": (False, True),
    "staging": constants.STAGINGS,
    "stages": (2, 3),
    "min_warps_per_sm": (0,),  # searched on request (--grid "min_warps_per_sm=0,16")
}
TUNABLE = tuple(DEFAULT_GRID)

# Knob -> (the values spec validation can ever accept, how to say so). Whether a value is valid in a
# combination (register and shared-memory budgets, clusters per arch) is left to spec validation.
_INT_KNOBS: dict[str, tuple[Iterable[int], str]] = {
    "warps_per_cta": (constants.WARPS_PER_CTA, ", ".join(map(str, constants.WARPS_PER_CTA))),
    "tiles_per_warp": (range(1, constants.MAX_TILES_PER_WARP + 1), f"1..{constants.MAX_TILES_PER_WARP}"),
    "tiles_in_flight": (constants.TILES_IN_FLIGHT, ", ".join(map(str, constants.TILES_IN_FLIGHT))),
    "cluster_size": (constants.CLUSTER_SIZES, ", ".join(map(str, constants.CLUSTER_SIZES))),
    "stages": (constants.STAGE_COUNTS, ", ".join(map(str, constants.STAGE_COUNTS))),
    "min_warps_per_sm": (constants.MIN_WARPS_PER_SM, ", ".join(map(str, constants.MIN_WARPS_PER_SM))),
}


def allowed_values(knob: str) -> str:
    """The values ``knob`` may take, in words (what a grid error says)."""
    if knob == "persistent":
        return "true, false"
    if knob == "staging":
        return ", ".join(constants.STAGINGS)
    return _INT_KNOBS[knob][1]


def _in_domain(knob: str, value: Any) -> bool:
    if knob == "persistent":
        return isinstance(value, bool)
    if knob == "staging":
        return isinstance(value, str) and value in constants.STAGINGS
    # bool is an int subclass (True == 1): `warps_per_cta=true` is a mistake, not 1 warp
    return isinstance(value, int) and not isinstance(value, bool) and value in _INT_KNOBS[knob][0]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_grid_values(grid: Mapping[str, Iterable[Any]]) -> None:
    """ValueError naming each value of ``grid`` that no candidate can take, with the allowed values.

    Checked before any GPU work: a value outside a knob's allowed set would only drop candidates silently,
    and a knob all of whose values are invalid would leave nothing to tune but the spec's own target.
    """
    bad: list[str] = []
    none_left = False
    for knob, values in grid.items():
        if knob not in TUNABLE:
            raise ValueError(f"unknown tuning knob {knob!r}; allowed: {', '.join(TUNABLE)}")
        values = tuple(values)
        wrong = [v for v in values if not _in_domain(knob, v)]
        if wrong:
            none_left = none_left or len(wrong) == len(values)
            bad.append(f"{knob}={','.join(map(_show, wrong))} is not allowed (allowed: {allowed_values(knob)})")
    if bad:
        lead = "no candidate is valid: " if none_left else ""
        raise ValueError(lead + "; ".join(bad))


def check_grid(spec: Spec, arch: str, grid: Mapping[str, Iterable[Any]]) -> None:
    """ValueError unless some combination of ``grid`` (merged into DEFAULT_GRID) is valid for ``spec`` on
    ``arch``; the message names the values and why the first combination fails."""
    check_grid_values(grid)
    full = merge_grid(grid)
    first: tuple[dict[str, Any], str] | None = None
    for vals in itertools.product(*full.values()):
        cand = dict(zip(full, vals, strict=True))
        why = _why_invalid(spec, arch, cand)
        if why is None:
            return
        first = first or (cand, why)
    given = "; ".join(f"{k}={','.join(map(_show, v))}" for k, v in grid.items())
    detail = f", e.g. {describe(first[0])}: {first[1]}" if first else ""
    raise ValueError(f"no candidate is valid: no combination of {given} (other knobs: the default grid) is a valid "
                     f"target for {spec.name} on {arch}{detail}")  # fmt: skip


def parse_grid(text: str) -> dict[str, tuple[Any, ...]]:
    """``"warps_per_cta=4,8;persistent=true"`` -> ``{"warps_per_cta": (4, 8), "persistent": (True,)}``.

    Only the knobs named change; the others keep DEFAULT_GRID's values (merge with :func:`merge_grid`).
    """
    grid: dict[str, tuple[Any, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, vals = part.partition("=")
        key = key.strip()
        if not sep or key not in TUNABLE:
            raise ValueError(f"grid entry {part!r}: expected KNOB=V1,V2 with KNOB one of {', '.join(TUNABLE)}")
        values = []
        for v in filter(None, (s.strip() for s in vals.split(","))):
            if v.lower() in ("true", "false"):
                values.append(v.lower() == "true")
            elif key == "staging":
                values.append(v)  # spec validation names the allowed values
            else:
                try:
                    values.append(int(v))
                except ValueError:
                    raise ValueError(f"grid entry {part!r}: {v!r} is not an integer or true/false") from None
        if not values:
            raise ValueError(f"grid entry {part!r} lists no values")
        grid[key] = tuple(dict.fromkeys(values))
    return grid


def merge_grid(override: Mapping[str, Iterable[Any]] | None) -> dict[str, tuple[Any, ...]]:
    grid = dict(DEFAULT_GRID)
    for key, values in (override or {}).items():
        if key not in TUNABLE:
            raise ValueError(f"unknown tuning knob {key!r}; allowed: {', '.join(TUNABLE)}")
        grid[key] = tuple(values)
    return grid


def current(spec: Spec) -> dict[str, Any]:
    """The spec's own values of the tunable knobs (the baseline every search includes)."""
    return {key: getattr(spec.target, key) for key in TUNABLE}


def candidates(spec: Spec, arch: str, grid: Mapping[str, Iterable[Any]] | None = None) -> list[dict[str, Any]]:
    """Every combination of the grid that ``spec.replace_target`` accepts and that runs on ``arch``.

    The spec's own target comes first (the baseline), then the grid in order, without duplicates.
    """
    full = merge_grid(grid)
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    combos = itertools.product(*full.values())
    for cand in itertools.chain([current(spec)], (dict(zip(full, vals, strict=True)) for vals in combos)):
        key = tuple(cand[k] for k in TUNABLE)
        if key in seen or not is_valid(spec, arch, cand):
            continue
        seen.add(key)
        out.append(cand)
    return out


def is_valid(spec: Spec, arch: str, cand: Mapping[str, Any]) -> bool:
    """Spec validation accepts it, and a cluster only where ``arch`` has clusters."""
    return _why_invalid(spec, arch, cand) is None


def _why_invalid(spec: Spec, arch: str, cand: Mapping[str, Any]) -> str | None:
    """None for a valid candidate, else why not."""
    if cand.get("cluster_size", 1) > 1 and arch not in constants.CLUSTER_ARCHS:
        return f"cluster_size {cand['cluster_size']} needs one of {', '.join(constants.CLUSTER_ARCHS)}, not {arch}"
    try:
        spec.replace_target(**cand)
    except SpecError as err:
        return err.message if not err.field else f"{err.field}: {err.message}"
    except TypeError as err:
        return str(err)
    return None


def describe(cand: Mapping[str, Any]) -> str:
    """Short label, e.g. ``W=4 T=64  F=2 C=1 P=0`` (warps, tiles/warp, in flight, cluster, persistent),
    with `` S=shared/2`` when loads are staged in shared memory (and the ring's stages)."""
    label = (f"W={cand['warps_per_cta']} T={cand['tiles_per_warp']:<3d} F={cand['tiles_in_flight']} "
             f"C={cand['cluster_size']} P={int(cand['persistent'])}")  # fmt: skip
    if cand.get("staging", "registers") == "shared":
        label += f" S=shared/{cand.get('stages', 2)}"
    if cand.get("min_warps_per_sm", 0):
        label += f" M={cand['min_warps_per_sm']}"
    return label
