"""The optional Hugging Face dependency of :mod:`swrgen.models` (the ``hf`` extra)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "pip install 'swrgen[hf]'"
MIN_VERSION = (5, 17)  # the dataclass configs, the Cache API and generate() this code is written against


def require_transformers(what: str = "swrgen.models") -> ModuleType:
    """``transformers``, or an ImportError that names the extra to install (and the version range)."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(f"{what} needs Hugging Face transformers (>=5.17,<6), which is not installed: "
                          f"{EXTRA}") from err  # fmt: skip
    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_VERSION or parts[0] >= 6:
        raise ImportError(f"{what} needs transformers >=5.17,<6; found {transformers.__version__}: {EXTRA}")
    return transformers
