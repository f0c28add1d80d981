"""Layers built on the SWR op: :class:`Phalanx` (the paper's drop-in for sliding-window attention)."""

from swrgen.nn.phalanx import Phalanx

__all__ = ["Phalanx"]
