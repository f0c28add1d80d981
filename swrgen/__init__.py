"""swrgen: a kernel generator for Sliding Window Recurrences (SWR) and the Phalanx layer.

y = swrgen.swr(a, x, window_blocks=2)        # a [B, H, L], x [B, H, DH, L]
op = swrgen.load("specs/hopper_k2.yaml")       # the compiled op for one spec
z = swrgen.phalanx_gating(P, heads=H)         # fused Phalanx gating + SWR on the [B, L, N] projections

The names above are imported on first use (PEP 562): ``import swrgen`` and ``import swrgen.spec`` load
neither torch nor cuda-python, so the spec tools (``swrgen validate/list/show``) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The version, written only here: pyproject.toml reads it for the package metadata (dynamic version), and
# __version__ falls back to it where swrgen runs from a source tree that was never installed.
_VERSION = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "phalanx_gating": "swrgen.ops.phalanx",
    "SwrOp": "swrgen.ops.swr",
    "load": "swrgen.ops.swr",
    "swr": "swrgen.ops.swr",
    "Spec": "swrgen.spec",
    "SpecError": "swrgen.spec",
    "load_spec": "swrgen.spec",
}

__all__ = ["Spec", "SpecError", "SwrOp", "__version__", "load", "load_spec", "phalanx_gating", "swr"]

if TYPE_CHECKING:
    from swrgen.ops.phalanx import phalanx_gating
    from swrgen.ops.swr import SwrOp, load, swr
    from swrgen.spec import Spec, SpecError, load_spec

    __version__: str


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("swrgen")
    except PackageNotFoundError:  # a source tree on sys.path, never pip-installed
        return _VERSION


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _installed_version()  # not cached: cheap, and asked for rarely
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swrgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
