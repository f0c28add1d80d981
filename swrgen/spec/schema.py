"""The spec data model: frozen dataclasses that validate themselves on construction.

Every ``Spec`` instance is valid by construction (``__post_init__`` checks each field and the cross-field
rules), so code downstream (codegen, compiler, ops) never re-checks a spec. The allowed values of the
recurrence and target come from ``swrgen.constants``; this module adds the defaults, the rules that tie
fields together and the limits of the name.

Errors are ``SpecError`` with a dotted ``field`` path in the YAML shape (``recurrence.dtypes.output``,
``target.archs[1]``); the loader adds the file and line, so one set of checks serves files and dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from swrgen import constants as C
from swrgen.spec.staging import max_shared_bytes, spec_layouts

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The name is a folder name (generated/<name>/) and goes into file names and paths: far below any file
# system's 255-byte limit, with room for the output root.
MAX_NAME_LEN = 64
NAME_ALLOWED = f"an identifier matching [A-Za-z_][A-Za-z0-9_]* of at most {MAX_NAME_LEN} characters"

# Recurrence attribute -> YAML key under recurrence.dtypes (the YAML groups the dtypes).
DTYPE_KEYS: dict[str, str] = {
    "input": "input_dtype",
    "gate": "gate_dtype",
    "output": "output_dtype",
    "accum": "accum_dtype",
}
_DTYPE_ATTR_TO_KEY = {attr: key for key, attr in DTYPE_KEYS.items()}


class SpecError(ValueError):
    """A spec that cannot be used, located as precisely as the input allows.

    ``str(err)`` reads ``source:line: field: message; allowed: ...`` so a CLI can print it as is and
    editors can jump to the line. ``line`` is 1-based, or None when the spec did not come from a file.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        source: str | None = None,
        line: int | None = None,
        allowed: str | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.source = source
        self.line = line
        self.allowed = allowed
        super().__init__(str(self))

    def __str__(self) -> str:
        location = ""
        if self.source:
            location = self.source if self.line is None else f"{self.source}:{self.line}"
        text = ": ".join(part for part in (location, self.field, self.message) if part)
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text

    def __reduce__(self):  # keep keyword-only state across pickling (e.g. process pools)
        return (_rebuild_spec_error, (self.message, self.field, self.source, self.line, self.allowed))

    def located(self, source: str | None, line: int | None = None) -> SpecError:
        """A copy that names where the spec came from (validation itself does not know)."""
        return SpecError(self.message, field=self.field, source=source, line=line, allowed=self.allowed)


def _rebuild_spec_error(message, field, source, line, allowed) -> SpecError:
    return SpecError(message, field=field, source=source, line=line, allowed=allowed)


# --- field checks ---------------------------------------------------------------------------------------


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _join(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; a spec that says `head_dim: true` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_choice(value: Any, path: str, choices: Iterable[int]) -> int:
    choices = tuple(choices)
    if not _is_int(value):
        raise SpecError(f"expected an integer, {_got(value)}", field=path, allowed=_join(choices))
    if value not in choices:
        raise SpecError(_got(value), field=path, allowed=_join(choices))
    return int(value)


def check_int_range(value: Any, path: str, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise SpecError(f"expected an integer, {_got(value)}", field=path, allowed=f"{lo}..{hi}")
    if not lo <= value <= hi:
        raise SpecError(f"{_got(value)}, out of range", field=path, allowed=f"{lo}..{hi}")
    return int(value)


def check_str_choice(value: Any, path: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str):
        raise SpecError(f"expected a string, {_got(value)}", field=path, allowed=_join(choices))
    if value not in choices:
        message = _got(value)
        close = difflib.get_close_matches(value, choices, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        raise SpecError(message, field=path, allowed=_join(choices))
    return value


def check_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"expected true or false, {_got(value)}", field=path, allowed="true, false")
    return value


def check_keys(given: Iterable[Any], allowed: Iterable[str], path: str) -> None:
    """Reject unknown keys, suggesting the closest allowed one (typos are the usual cause)."""
    allowed = tuple(allowed)
    for key in given:
        sub = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            raise SpecError(f"key {key!r} is not a string", field=sub, allowed=_join(allowed))
        if key not in allowed:
            message = f"unknown key {key!r}"
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            raise SpecError(message, field=sub, allowed=_join(allowed))


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising fields of a frozen dataclass in __post_init__


# --- the dataclasses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recurrence:
    """What is computed (docs/semantics.md): the result depends only on these fields and the data."""

    head_dim: int = 16
    block_len: int = 16
    window_blocks: int = 2
    gate_layout: str = "per_head"
    fused_gating: bool = False
    input_dtype: str = "bf16"
    gate_dtype: str | None = None  # None means "same as input_dtype"; always a str after construction
    output_dtype: str = "fp32"
    accum_dtype: str = "fp32"

    def __post_init__(self) -> None:
        p = path_of_recurrence_field
        _set(self, "head_dim", check_int_choice(self.head_dim, p("head_dim"), C.HEAD_DIMS))
        _set(self, "block_len", check_int_choice(self.block_len, p("block_len"), C.BLOCK_LENS))
        _set(
            self,
            "window_blocks",
            check_int_range(self.window_blocks, p("window_blocks"), 1, C.MAX_WINDOW_BLOCKS),
        )
        check_str_choice(self.gate_layout, p("gate_layout"), C.GATE_LAYOUTS)
        check_bool(self.fused_gating, p("fused_gating"))
        check_str_choice(self.input_dtype, p("input_dtype"), C.DTYPES)
        if self.gate_dtype is None:
            _set(self, "gate_dtype", self.input_dtype)
        check_str_choice(self.gate_dtype, p("gate_dtype"), C.DTYPES)
        check_str_choice(self.output_dtype, p("output_dtype"), C.DTYPES)
        # Writing a narrower type than fp32 only makes sense as "same as the input" (drop-in output);
        # any other narrowing would lose precision the caller did not ask for.
        if self.output_dtype not in ("fp32", self.input_dtype):
            raise SpecError(
                f"got {self.output_dtype!r}: the output must be fp32 or the input dtype ({self.input_dtype})",
                field=p("output_dtype"),
                allowed=_join(dict.fromkeys(("fp32", self.input_dtype))),
            )
        check_str_choice(self.accum_dtype, p("accum_dtype"), C.ACCUM_DTYPES)
        if self.fused_gating:
            self._check_fused()

    def _check_fused(self) -> None:
        """The fused Phalanx kernels read one projection tensor and write Z for the next GEMM."""
        p = path_of_recurrence_field
        if self.head_dim != C.CHANNELS_PER_WARP:
            raise SpecError(f"fused_gating runs one warp per head; got head_dim {self.head_dim}",
                            field=p("head_dim"), allowed=f"{C.CHANNELS_PER_WARP} with fused_gating")  # fmt: skip
        if self.gate_layout != "per_head":
            raise SpecError(f"fused_gating takes the Phalanx layer's per-head gates; got {self.gate_layout!r}",
                            field=p("gate_layout"), allowed="per_head with fused_gating")  # fmt: skip
        for attr in ("gate_dtype", "output_dtype"):
            if getattr(self, attr) != self.input_dtype:
                raise SpecError(
                    f"fused_gating reads gates from the projections and writes Z for the output projection, all in "
                    f"the input dtype ({self.input_dtype}); got {getattr(self, attr)!r}",
                    field=p(attr), allowed=f"{self.input_dtype} (the input dtype) with fused_gating",
                )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _DTYPE_ATTR_TO_KEY
        }
        out["dtypes"] = {key: getattr(self, attr) for key, attr in DTYPE_KEYS.items()}
        return out


def path_of_recurrence_field(attr: str) -> str:
    """YAML path of a Recurrence attribute (dtypes live under recurrence.dtypes)."""
    if attr in _DTYPE_ATTR_TO_KEY:
        return f"recurrence.dtypes.{_DTYPE_ATTR_TO_KEY[attr]}"
    return f"recurrence.{attr}"


@dataclass(frozen=True)
class Carriers:
    """How a tile's carrier crosses each level of the hierarchy (see constants.WARP_CARRIERS)."""

    warp: str = "registers"
    cta: str = "halo"
    cluster: str = "halo"

    def __post_init__(self) -> None:
        check_str_choice(self.warp, "target.carriers.warp", C.WARP_CARRIERS)
        check_str_choice(self.cta, "target.carriers.cta", C.CTA_CARRIERS)
        check_str_choice(self.cluster, "target.carriers.cluster", C.CLUSTER_CARRIERS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    """How it is computed: tuning knobs that must never change the result, only the speed."""

    archs: tuple[str, ...] = ("sm_90a",)
    warps_per_cta: int = 4
    tiles_per_warp: int = 64  # measured best on H100 at L 2K-128K (bench/RESULTS.md)
    tiles_in_flight: int = 8  # tiles per load batch; with registers staging the backward caps at 2 (RESULTS.md)
    cluster_size: int = 1
    persistent: bool = False
    staging: str = "registers"  # where loads wait: registers, or a cp.async shared-memory ring (staging.py)
    stages: int = 2  # batches of tiles_in_flight in the shared ring (registers: double-buffered, 2)
    min_warps_per_sm: int = 0  # register cap for the vector kernels via __launch_bounds__ (0: none)
    carriers: Carriers = field(default_factory=Carriers)

    def __post_init__(self) -> None:
        archs = self.archs
        if isinstance(archs, str) or not isinstance(archs, (list, tuple)):
            raise SpecError(
                f"expected a list of architectures, {_got(archs)}",
                field="target.archs",
                allowed=_join(C.ARCHS),
            )
        if not archs:
            raise SpecError("the list is empty", field="target.archs", allowed=_join(C.ARCHS))
        seen: dict[str, int] = {}
        for i, arch in enumerate(archs):
            check_str_choice(arch, f"target.archs[{i}]", C.ARCHS)
            if arch in seen:
                raise SpecError(
                    f"duplicate architecture {arch!r} (also target.archs[{seen[arch]}])",
                    field=f"target.archs[{i}]",
                    allowed=_join(C.ARCHS),
                )
            seen[arch] = i
        _set(self, "archs", tuple(archs))
        _set(
            self,
            "warps_per_cta",
            check_int_choice(self.warps_per_cta, "target.warps_per_cta", C.WARPS_PER_CTA),
        )
        _set(
            self,
            "tiles_per_warp",
            check_int_range(self.tiles_per_warp, "target.tiles_per_warp", 1, C.MAX_TILES_PER_WARP),
        )
        _set(
            self,
            "tiles_in_flight",
            check_int_choice(self.tiles_in_flight, "target.tiles_in_flight", C.TILES_IN_FLIGHT),
        )
        _set(self, "cluster_size", check_int_choice(self.cluster_size, "target.cluster_size", C.CLUSTER_SIZES))
        check_bool(self.persistent, "target.persistent")
        check_str_choice(self.staging, "target.staging", C.STAGINGS)
        _set(self, "stages", check_int_choice(self.stages, "target.stages", C.STAGE_COUNTS))
        _set(
            self,
            "min_warps_per_sm",
            check_int_choice(self.min_warps_per_sm, "target.min_warps_per_sm", C.MIN_WARPS_PER_SM),
        )
        if self.staging == "registers" and self.stages != 2:
            raise SpecError(
                f"got {self.stages}, but staging 'registers' double-buffers (2 stages); more need staging 'shared'",
                field="target.stages",
                allowed="2 with staging 'registers'; " + _join(C.STAGE_COUNTS) + " with staging 'shared'",
            )
        if isinstance(self.carriers, Mapping):
            check_keys(self.carriers, field_names(Carriers), "target.carriers")
            _set(self, "carriers", Carriers(**self.carriers))
        elif not isinstance(self.carriers, Carriers):
            raise SpecError(
                f"expected a mapping, {_got(self.carriers)}",
                field="target.carriers",
                allowed=_join(field_names(Carriers)),
            )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["archs"] = list(self.archs)
        out["carriers"] = self.carriers.to_dict()
        return out


def check_name(value: Any) -> str:
    """The name names the generated folder and appears in the CUDA source, so it is a short identifier."""
    if not isinstance(value, str):
        raise SpecError(f"expected a string, {_got(value)}", field="name", allowed=NAME_ALLOWED)
    if not NAME_RE.fullmatch(value):
        raise SpecError(f"{_got(value)}, not an identifier", field="name", allowed=NAME_ALLOWED)
    if len(value) > MAX_NAME_LEN:
        raise SpecError(f"got a name of {len(value)} characters ({value[:20]!r}...), longer than {MAX_NAME_LEN}",
                        field="name", allowed=NAME_ALLOWED)  # fmt: skip
    return value


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def fitting_tiles_in_flight(block_len: int) -> tuple[int, ...]:
    """tiles_in_flight values whose loads fit the per-lane register budget for this block_len."""
    per_tile = C.tokens_per_lane(block_len)
    return tuple(t for t in C.TILES_IN_FLIGHT if per_tile * t <= C.MAX_TOKENS_IN_FLIGHT_PER_LANE)


def default_tiles_in_flight(block_len: int) -> int:
    """Target's default (``Target.tiles_in_flight``), capped to what fits the register budget of ``block_len``,
    so an unspecified value never makes a valid recurrence fail."""
    default = Target.tiles_in_flight
    fitting = [t for t in fitting_tiles_in_flight(block_len) if t <= default]
    return max(fitting) if fitting else min(C.TILES_IN_FLIGHT)


@dataclass(frozen=True)
class Spec:
    """One kernel family: a recurrence plus the target it is tuned for. ``source`` is provenance only."""

    name: str
    description: str = ""
    recurrence: Recurrence = field(default_factory=Recurrence)
    target: Target = field(default_factory=Target)
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.description, str):
            raise SpecError(f"expected a string, {_got(self.description)}", field="description")
        if not isinstance(self.recurrence, Recurrence):
            raise SpecError(f"expected a Recurrence, {_got(self.recurrence)}", field="recurrence")
        if not isinstance(self.target, Target):
            raise SpecError(f"expected a Target, {_got(self.target)}", field="target")
        self._check_cross_fields()

    def _check_cross_fields(self) -> None:
        t, r = self.target, self.recurrence
        if t.cluster_size > 1:
            for arch in t.archs:
                if arch not in C.CLUSTER_ARCHS:
                    raise SpecError(
                        f"got {t.cluster_size}, but clusters need sm_90 or newer; {arch} has none "
                        f"(use cluster_size 1 or drop {arch} from target.archs)",
                        field="target.cluster_size",
                        allowed="1 unless every arch is one of " + _join(C.CLUSTER_ARCHS),
                    )
        per_tile = C.tokens_per_lane(r.block_len)
        in_flight = per_tile * t.tiles_in_flight
        if in_flight > C.MAX_TOKENS_IN_FLIGHT_PER_LANE and t.staging == "registers":
            raise SpecError(
                f"got {t.tiles_in_flight}: a tile that does not fit: block_len {r.block_len} / "
                f"{C.LANES_PER_TILE} lanes = {per_tile} tokens per lane x {t.tiles_in_flight} tiles "
                f"in flight = {in_flight} > limit {C.MAX_TOKENS_IN_FLIGHT_PER_LANE} tokens in flight per "
                "lane (the loads would spill to local memory)",
                field="target.tiles_in_flight",
                allowed=_join(fitting_tiles_in_flight(r.block_len)) + f" for block_len {r.block_len} with staging "
                "'registers'; staging 'shared' takes more, as far as shared memory goes",
            )
        if t.staging == "shared":
            limit = max_shared_bytes(t.archs)
            for direction, lay in spec_layouts(r, t).items():
                if lay.cta_bytes > limit:
                    raise SpecError(
                        f"got 'shared', but the {direction} kernel needs {t.warps_per_cta} warps x "
                        f"({lay.stages} stages x {lay.stage_bytes} + {lay.ring_bytes} dy ring + {lay.out_bytes} "
                        "output) bytes = "
                        f"{lay.cta_bytes} bytes of shared memory per CTA, over the {limit} bytes "
                        f"of {', '.join(t.archs)}",
                        field="target.staging",
                        allowed="'registers', or 'shared' with fewer warps_per_cta, tiles_in_flight or stages",
                    )
        # warps_per_cta * cluster_size is at most 32 * 8 by the allowed sets: no extra check needed.

    def to_dict(self) -> dict[str, Any]:
        """Canonical nested dict in the YAML shape, every default filled in (``source`` left out)."""
        return {
            "name": self.name,
            "description": self.description,
            "recurrence": self.recurrence.to_dict(),
            "target": self.target.to_dict(),
        }

    def digest(self) -> str:
        """Content hash for caches and generated-file headers; independent of where the spec came from."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def replace_target(self, **changes: Any) -> Spec:
        """A new validated Spec with some target fields changed (autotuning sweeps use this)."""
        try:
            check_keys(changes, field_names(Target), "target")
            return dataclasses.replace(self, target=dataclasses.replace(self.target, **changes))
        except SpecError as err:
            raise err.located(self.source) from None

    def replace_recurrence(self, **changes: Any) -> Spec:
        """A new validated Spec with some recurrence fields changed; only the named fields change."""
        try:
            check_keys(changes, field_names(Recurrence), "recurrence")
            return dataclasses.replace(self, recurrence=dataclasses.replace(self.recurrence, **changes))
        except SpecError as err:
            raise err.located(self.source) from None


# --- default spec ---------------------------------------------------------------------------------------

_DEFAULT_RECURRENCE = Recurrence()


def default_spec_name(rec: Recurrence) -> str:
    """Deterministic name for a recurrence, distinct for distinct recurrences (it names generated files)."""
    layout = "".join(word[0] for word in rec.gate_layout.split("_"))  # per_head -> ph, per_channel -> pc
    name = f"swr_dh{rec.head_dim}_bl{rec.block_len}_k{rec.window_blocks}_{rec.input_dtype}_{rec.output_dtype}_{layout}"
    if rec.gate_dtype != rec.input_dtype:
        name += f"_g{rec.gate_dtype}"
    if rec.accum_dtype != _DEFAULT_RECURRENCE.accum_dtype:
        name += f"_a{rec.accum_dtype}"
    if rec.fused_gating:
        name += "_fused"
    return name


def default_spec(**recurrence_fields: Any) -> Spec:
    """The spec used when the op is called without one: these recurrence fields, target defaults.

    Cached, because the op may call it on every invocation; the key carries each value's type so that
    ``window_blocks=True`` is not served the cached spec of ``window_blocks=1``.
    """
    key = tuple(sorted((k, type(v), v) for k, v in recurrence_fields.items()))
    try:
        hash(key)
    except TypeError:
        return _default_spec(recurrence_fields)  # unhashable value: still validated (and rejected)
    return _default_spec_cached(key)


@functools.lru_cache(maxsize=256)
def _default_spec_cached(key: tuple[tuple[str, type, Any], ...]) -> Spec:
    return _default_spec({k: v for k, _, v in key})


def _default_spec(recurrence_fields: dict[str, Any]) -> Spec:
    try:
        check_keys(recurrence_fields, field_names(Recurrence), "recurrence")
        rec = Recurrence(**recurrence_fields)
        target = Target(tiles_in_flight=default_tiles_in_flight(rec.block_len))
        return Spec(
            name=default_spec_name(rec),
            description="derived by swrgen.spec.default_spec from the recurrence fields; target defaults",
            recurrence=rec,
            target=target,
            source="<default_spec>",
        )
    except SpecError as err:
        raise err.located("<default_spec>") from None
