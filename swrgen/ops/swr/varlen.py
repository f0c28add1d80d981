"""Packed variable-length batches (``cu_seqlens``): the float64 reference and the argument checks.

Sequences are concatenated along L in one buffer: ``x`` ``[1, H, DH, T]``, gates ``[1, H, T]`` (per head)
or ``[1, H, DH, T]`` (per channel), and ``cu_seqlens`` = ``[0, L_0, L_0+L_1, ..., T]`` (int32/int64,
``S + 1`` entries for S sequences). Tiles are aligned to each sequence's own start and no window crosses
a sequence boundary, so the result equals running every sequence alone (docs/semantics.md). Empty
sequences (two equal consecutive offsets) are allowed and contribute nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from swrgen.ops.swr.reference import check_swr_args, swr_reference

__all__ = ["check_cu_seqlens", "cu_seqlens_list", "swr_varlen_reference"]


def check_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int], total: int) -> torch.Tensor:
    """Validate ``cu_seqlens`` for a packed buffer of ``total`` tokens; returns it as an int64 CPU tensor.

    Raises TypeError for a non-integer dtype and ValueError for a tensor that is not 1-D, has fewer than
    2 entries, does not start at 0, decreases, or does not end at ``total``. Reads the values (a host
    sync for a CUDA tensor): call it once per batch, not inside a captured graph.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        try:
            cu_seqlens = torch.tensor(list(cu_seqlens))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a sequence of ints; got {cu_seqlens!r}") from e
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor (torch.int32 or torch.int64); got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1]; got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must have at least 2 entries ([0, ..., T] for S >= 1 sequences); got {cu_seqlens.tolist()}"
        )
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {vals[0]} (cu_seqlens = {_short(vals)})")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing; entry {i + 1} = {vals[i + 1]} < entry {i} = {vals[i]} "
            f"(cu_seqlens = {_short(vals)})"
        )
    if vals[-1] != int(total):
        raise ValueError(
            f"cu_seqlens must end at the packed length T = {int(total)}; got {vals[-1]} (cu_seqlens = {_short(vals)})"
        )
    return cu


def _short(vals: list[int]) -> str:
    return str(vals) if len(vals) <= 12 else f"[{', '.join(map(str, vals[:5]))}, ..., {', '.join(map(str, vals[-5:]))}]"


def cu_seqlens_list(cu_seqlens: torch.Tensor | Sequence[int], total: int) -> list[tuple[int, int]]:
    """The checked ``(start, end)`` of every non-empty sequence."""
    vals = check_cu_seqlens(cu_seqlens, total).tolist()
    return [(s, e) for s, e in itertools.pairwise(vals) if e > s]


def _check_packed(a: torch.Tensor, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"packed x must be [1, H, DH, T] (batch 1: sequences are packed along T); got {list(x.shape)}")


def swr_varlen_reference(
    a: torch.Tensor,
    x: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    window_blocks: int = 2,
    block_len: int = 16,
) -> torch.Tensor:
    """SWR of every packed sequence alone, in float64: ``swr_reference`` per slice, concatenated.

    a: ``[1, H, T]`` or ``[1, H, DH, T]``; x: ``[1, H, DH, T]``; returns float64 ``[1, H, DH, T]``.
    Differentiable (torch autograd) in ``a`` and ``x``.
    """
    _check_packed(a, x)
    check_swr_args(a, x, window_blocks, block_len)
    spans = cu_seqlens_list(cu_seqlens, x.shape[-1])
    ys = [swr_reference(a[..., s:e], x[..., s:e], window_blocks, block_len) for s, e in spans]
    return torch.cat(ys, dim=-1)
