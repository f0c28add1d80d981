"""Sliding Window Recurrence: reference, tiled mirror, generated CUDA kernels, torch op."""

from swrgen.ops.swr.op import SwrOp, load, swr

__all__ = ["SwrOp", "load", "swr"]
