"""Tuned configs on disk: one JSON file per recurrence, entries per (arch, NVRTC version, shape bucket), and
per card where the tuner knew it (``sm_90a/H200/nvrtc13.0/rows256/L8192``: cards of one arch differ).

Files live in ``default_cache_dir()/tuned/`` (``$SWRGEN_CACHE_DIR`` overrides, like the cubin cache),
then in the package's ``swrgen/tune/tuned/`` (configs shipped with the source; consulted second, so a
local tuning run wins). A file is named by the hash of the spec's ``recurrence`` section: the target
knobs are what gets tuned, so they cannot be part of the key; name and description are irrelevant.

    {"version": 1, "recurrence": {...}, "entries": {"sm_90a/nvrtc13.0/rows256/L8192": {
        "target": {"warps_per_cta": 4, ...}, "fwd_ms": ..., "bwd_ms": ..., "objective": "train", ...}}}

A spec with ``recurrence.fused_gating: true`` is tuned on its fused Phalanx kernels (``phalanx_fwd_*`` /
``phalanx_bwd_*``; ``swrgen tune`` takes its shapes as B,L,H and saves under the bucket of (B, H, 16, L),
one warp row per head), so its file's entries are for those kernels (each entry's ``family`` says so).
Its file is never the plain spec's: ``fused_gating`` is part of the recurrence, hence of the hash. (A
plain-kernel launch of the same fused spec would look up the same entries; the fused ones are what count.)

Writes go to a temporary file renamed into place (readers see the old file or the whole new one). A
file that does not parse or has the wrong shape is ignored on read and replaced by the next save; an
entry whose target is malformed is ignored alone. Two tuners saving at once: the last rename wins.

The in-process state (what was read, the environment, the tuner's ``disabled()``) belongs to one
:class:`TunedStore`, ``STORE``; ``lookup``, ``save``, ``disabled`` and ``clear_memo`` are its methods.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from swrgen.compiler.cache import ENV_CACHE_DIR, default_cache_dir
from swrgen.spec import Spec
from swrgen.tune.buckets import bucket_name, bucket_of
from swrgen.tune.space import TUNABLE

VERSION = 1
ENV_DISABLE = "SWRGEN_TUNED"  # "0": lookup() always answers None (time the untuned defaults)
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"
_KNOB_TYPES = {"warps_per_cta": int, "tiles_per_warp": int, "tiles_in_flight": int, "cluster_size": int,
               "persistent": bool, "staging": str, "stages": int, "min_warps_per_sm": int}  # fmt: skip

def tuned_dir() -> Path:
    """Where tuning runs write (and lookups look first)."""
    return default_cache_dir() / "tuned"


def search_dirs() -> tuple[Path, ...]:
    return (tuned_dir(), SHIPPED_DIR)


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    """NVRTC version (cubins differ across versions, and so may the best config); "unknown" without one."""
    try:
        from swrgen.compiler.nvrtc import nvrtc_version

        return nvrtc_version()
    except Exception:  # no cuda-bindings / NVRTC library: still a valid (if useless) key
        return "unknown"


@functools.lru_cache(maxsize=256)
def recurrence_hash(recurrence: Any) -> str:
    """SHA-256 of the canonical ``recurrence`` dict (argument: a hashable ``spec.recurrence``)."""
    return hashlib.sha256(json.dumps(recurrence.to_dict(), sort_keys=True).encode()).hexdigest()


def entry_key(arch: str, bucket: tuple[int, int], nvrtc: str | None = None, device: str | None = None) -> str:
    """``sm_90a/nvrtc13.0/rows256/L8192``; with ``device`` (a :func:`device_tag`) ``sm_90a/H200/nvrtc13.0/...``."""
    where = f"{arch}/{device}" if device else arch
    return f"{where}/nvrtc{nvrtc or compiler_version()}/{bucket_name(bucket)}"


def device_tag(name: str) -> str:
    """A card's name as a key part: ``NVIDIA H100 80GB HBM3`` -> ``H100_80GB_HBM3``.

    Cards of one arch differ in bandwidth (an H100 and an H200 are both sm_90a), so the tuner stores its
    winner under the card's own key as well as the arch's; a lookup prefers the card's.
    """
    return re.sub(r"[^A-Za-z0-9]+", "_", name.removeprefix("NVIDIA ")).strip("_") or "unknown"


@functools.cache
def device_tag_of(index: int) -> str | None:
    """:func:`device_tag` of CUDA device ``index`` (asked once per device); None where torch cannot name it."""
    import torch

    try:
        return device_tag(torch.cuda.get_device_name(index))
    except (AssertionError, RuntimeError):  # no CUDA build or driver: only the arch's entries apply
        return None


def file_path(spec: Spec, directory: Path | None = None) -> Path:
    return (directory or tuned_dir()) / f"{recurrence_hash(spec.recurrence)[:32]}.json"


def valid_target(target: Any) -> bool:
    """A stored target: a dict of known knobs with values of the right type (bool is not an int)."""
    if not isinstance(target, dict) or not target or not set(target) <= set(TUNABLE):
        return False
    return all(type(v) is _KNOB_TYPES[k] for k, v in target.items())


def read_file(path: Path, rec_hash: str | None = None) -> dict[str, Any]:
    """Entries of one tuned file; {} when missing, unreadable, corrupt or for another recurrence."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        return {}
    if rec_hash is not None and data.get("recurrence_hash") != rec_hash:
        return {}
    return {k: e for k, e in data["entries"].items() if isinstance(e, dict) and valid_target(e.get("target"))}


class TunedStore:
    """The in-process view of the tuned-config files: the one owner of what was read, the environment as
    it was read, the tuner's ``disabled()`` depth and the listeners told when the stored configs change.

    :meth:`lookup` is on the launch path, so it is memoized: the first call for a recurrence reads its
    file(s); later calls are a dict lookup. The environment ($SWRGEN_TUNED, $SWRGEN_CACHE_DIR,
    $XDG_CACHE_HOME) is read on the first lookup too (reading ``os.environ`` costs ~0.7 us a variable);
    :meth:`save` and :meth:`reload` forget all of it and tell the listeners (the runtime's kernel sets,
    which drop the launch plans that embed a tuned choice).
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], dict[str, Any]] = {}  # (directory, recurrence hash) -> entries
        self._memo: dict[tuple[Any, ...], dict[str, Any] | None] = {}  # lookup key -> overrides
        self._env: tuple[bool, str | None, str | None] | None = None
        self._disabled = 0  # > 0 inside disabled(): the tuner times each candidate as built
        self._listeners: list[Callable[[], None]] = []

    @property
    def is_disabled(self) -> bool:
        """True inside :meth:`disabled` (nothing made then may be cached as a tuned choice)."""
        return self._disabled > 0

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever the stored configs may have changed (save, reload, disabled)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _entries(self, directory: Path, rec_hash: str) -> dict[str, Any]:
        key = (str(directory), rec_hash)
        if key not in self._files:
            self._files[key] = read_file(directory / f"{rec_hash[:32]}.json", rec_hash)
        return self._files[key]

    def save(self, spec: Spec, arch: str, shape: tuple[int, int, int, int], entry: dict[str, Any],
             directory: Path | None = None, device: str | None = None) -> Path:  # fmt: skip
        """Record ``entry`` (must hold ``target``) for the bucket of ``shape``; returns the file written.

        With ``device`` (a :func:`device_tag`) it goes under that card's key and under the arch's (the
        fallback for other cards of the arch)."""
        if not valid_target(entry.get("target")):
            raise ValueError(f"entry target {entry.get('target')!r} is not a dict of {', '.join(TUNABLE)}")
        directory = Path(directory) if directory is not None else tuned_dir()
        rec_hash = recurrence_hash(spec.recurrence)
        path = directory / f"{rec_hash[:32]}.json"
        entries = read_file(path, rec_hash)  # a corrupt file starts over
        entries[entry_key(arch, bucket_of(shape))] = entry
        if device:
            entries[entry_key(arch, bucket_of(shape), device=device)] = entry
        data = {"version": VERSION, "recurrence_hash": rec_hash, "recurrence": spec.recurrence.to_dict(),
                "entries": dict(sorted(entries.items()))}  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.reload()
        return path

    def lookup(self, spec: Spec, arch: str, shape: tuple[int, int, int, int], direction: str | None = None,
               device: str | None = None) -> dict[str, Any] | None:  # fmt: skip
        """Tuned target overrides for x.shape = [B, H, DH, L] on ``arch``, or None when none is stored.

        direction: "fwd" or "bwd" asks for the knobs of that kernel alone. The forward and backward are
        separate launches, so where one config is clearly best for the forward and another for the
        backward, the tuner stores ``fwd_target`` / ``bwd_target`` beside the joint ``target``; without
        one (or with direction None) the joint target answers.
        device: the card's :func:`device_tag`; its own entries win over the arch's, in every directory
        (a config tuned on this card, even shipped, beats one tuned locally on another card of the arch).
        Only overrides that the spec accepts are returned (e.g. no cluster for a spec that also lists
        sm_80), so ``spec.replace_target(**lookup(...))`` never raises. None inside :meth:`disabled`
        (while tuning) and when ``$SWRGEN_TUNED`` is ``0``.
        """
        if self._disabled:
            return None
        if self._env is None:
            self._env = (os.environ.get(ENV_DISABLE) == "0", os.environ.get(ENV_CACHE_DIR),
                         os.environ.get("XDG_CACHE_HOME"))  # fmt: skip
        if self._env[0]:  # $SWRGEN_TUNED=0
            return None
        key = (spec.recurrence, spec.target.archs, arch, bucket_of(tuple(shape)), direction, device)  # type: ignore[arg-type]
        try:
            result = self._memo[key]
        except KeyError:
            if direction is not None and direction not in DIRECTIONS:
                raise ValueError(f"direction {direction!r}; allowed: None, {', '.join(DIRECTIONS)}") from None
            result = self._memo[key] = self._lookup_uncached(spec, arch, key[3], search_dirs(), direction, device)
        return dict(result) if result is not None else None  # a copy: callers may change it

    def _lookup_uncached(self, spec: Spec, arch: str, bucket: tuple[int, int], dirs: tuple[Path, ...],
                         direction: str | None, device: str | None) -> dict[str, Any] | None:  # fmt: skip
        from swrgen.tune.space import is_valid

        rec_hash = recurrence_hash(spec.recurrence)
        names = ([entry_key(arch, bucket, device=device)] if device else []) + [entry_key(arch, bucket)]
        for name in names:
            for directory in dirs:
                entry = self._entries(directory, rec_hash).get(name)
                if entry is None:
                    continue
                own = entry.get(f"{direction}_target") if direction else None
                if valid_target(own) and is_valid(spec, arch, own):
                    return dict(own)
                if is_valid(spec, arch, entry["target"]):
                    return dict(entry["target"])
        return None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside: lookup() answers None (the tuner uses this so a stored choice never replaces a candidate)."""
        self._disabled += 1
        self._changed()
        try:
            yield
        finally:
            self._disabled -= 1
            self._changed()

    def reload(self) -> None:
        """Forget everything read, the environment included (after a save; tests)."""
        self._files.clear()
        self._memo.clear()
        self._env = None
        self._changed()


DIRECTIONS = ("fwd", "bwd")
STORE = TunedStore()
# Module-level spellings of the one store's methods (the tuner, the CLI and tests use these).
save = STORE.save
lookup = STORE.lookup
disabled = STORE.disabled
clear_memo = STORE.reload
