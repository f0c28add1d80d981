"""The YAML spec language: what a generated SWR kernel computes (recurrence) and how (target).

Specs are frozen and valid by construction, so the rest of swrgen can trust any ``Spec`` it is handed.
"""

from __future__ import annotations

from pathlib import Path

from swrgen.spec.loader import load_spec, spec_from_dict, spec_from_yaml
from swrgen.spec.schema import Carriers, Recurrence, Spec, SpecError, Target, default_spec


def __getattr__(name: str) -> Path:
    # SPECS_DIR: the folder of the shipped specs (swrgen.resources.specs_dir()); looked up on first use, so
    # validating a spec of one's own never depends on the shipped ones.
    if name == "SPECS_DIR":
        from swrgen import resources

        return resources.specs_dir()
    raise AttributeError(f"module 'swrgen.spec' has no attribute {name!r}")


__all__ = [
    "SPECS_DIR",
    "Carriers",
    "Recurrence",
    "Spec",
    "SpecError",
    "Target",
    "default_spec",
    "load_spec",
    "spec_from_dict",
    "spec_from_yaml",
]
