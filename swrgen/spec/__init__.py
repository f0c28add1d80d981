"""The YAML spec language: what a generated SWR kernel computes (recurrence) and how (target).

Specs are frozen and valid by construction, so the rest of swrgen can trust any ``Spec`` it is handed.
"""

from __future__ import annotations

from pathlib import Path

from swrgen.spec.loader import load_spec, spec_from_dict, spec_from_yaml
from swrgen.spec.schema import Carriers, Recurrence, Spec, SpecError, Target, default_spec

# The shipped specs (repository checkout only; specs/ is not package data).
SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"

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
