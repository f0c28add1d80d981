"""Models built on the Phalanx layer, Hugging Face compatible (docs/serving.md).

* :class:`PhalanxHybridConfig`, :class:`PhalanxHybridForCausalLM` (``PreTrainedModel`` + ``GenerationMixin``):
  Phalanx in the local slots, causal attention in the global ones; ``generate()``, ``save_pretrained`` /
  ``from_pretrained`` (safetensors).
* :class:`PhalanxHybridCache`: per Phalanx layer a pool of state slots ``[S, H, DH, 2 + 2(k-1)]`` (float32)
  with one shared position per slot, and the attention layers' KV per slot.
* :class:`StateSlots` (continuous batching: requests join and leave a running decode batch) and
  :class:`DecodeGraph` (one decode step captured in a CUDA graph).

Transformers is an optional extra (``pip install 'swrgen[hf]'``): importing this package works without it;
using one of the classes raises an ImportError that says what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PhalanxHybridConfig": "swrgen.models.configuration_phalanx_hybrid",
    "PhalanxHybridModel": "swrgen.models.modeling_phalanx_hybrid",
    "PhalanxHybridForCausalLM": "swrgen.models.modeling_phalanx_hybrid",
    "PhalanxHybridPreTrainedModel": "swrgen.models.modeling_phalanx_hybrid",
    "PhalanxHybridCache": "swrgen.models.cache",
    "StateSlots": "swrgen.models.serving",
    "DecodeGraph": "swrgen.models.serving",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'swrgen.models' has no attribute {name!r}")
    from swrgen.models._hf import require_transformers

    require_transformers(f"swrgen.models.{name}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
