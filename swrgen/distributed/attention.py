"""Causal self-attention over a sequence split across a context-parallel group.

Two ways, one result (causal attention of every token over all tokens before it, in every rank's slice):

- ``"gather"`` (any backend, the CPU tests): each rank all-gathers K and V (variable slice lengths, padded
  to the longest) and attends from its own queries with a causal mask shifted by its global offset. The
  backward all-reduces the gathered gradient and keeps its own slice. Memory O(L) per rank for K and V.
- ``"torch"``: torch's own context parallelism, ``torch.distributed.tensor.experimental.context_parallel``
  (ring attention over the SDPA flash / memory-efficient / cuDNN kernels: **CUDA only**; on the CPU the
  SDPA op is ``_scaled_dot_product_flash_attention_for_cpu``, for which DTensor has no sharding strategy,
  and the math backend mixes DTensor with plain tensors and fails). The attention layer calls plain
  ``F.scaled_dot_product_attention(..., is_causal=True)`` and the context replaces it. Use
  :func:`torch_context_parallel`, which turns torch's load balancing off: the Phalanx layers need each
  rank's slice to be one contiguous piece, and torch's default head-tail balancing gives each rank two.
  Ring attention rotates K/V shards of one size, so every rank's slice must have the same length
  (L divisible by the CP world size), and the attention takes no mask (dense batches, no packing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swrgen.distributed.context_parallel import CPContext

__all__ = ["causal_attention", "gather_sequence", "torch_context_parallel", "torch_cp_active"]

_SDPA = F.scaled_dot_product_attention  # torch's context_parallel swaps this attribute while it is active


def torch_cp_active() -> bool:
    """Whether torch's ``context_parallel`` has replaced ``F.scaled_dot_product_attention`` right now."""
    return F.scaled_dot_product_attention is not _SDPA


class _GatherSequence(torch.autograd.Function):
    """All-gather slices of different lengths along ``dim``; backward: all-reduce, keep this rank's slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, ctx_cp: CPContext, dim: int) -> torch.Tensor:
        layout = ctx_cp.layout
        lengths = [b - a for a, b in zip(layout.offsets[:-1], layout.offsets[1:], strict=True)]
        longest = max(lengths)
        pad = [0, 0] * (t.dim() - 1 - dim) + [0, longest - t.shape[dim]]
        padded = F.pad(t, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded, group=ctx_cp.group)
        ctx.cp, ctx.dim = ctx_cp, dim
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths, strict=True)], dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp.group)
        layout = ctx.cp.layout
        return grad.narrow(ctx.dim, layout.start, layout.length), None, None


def gather_sequence(t: torch.Tensor, cp: CPContext, dim: int) -> torch.Tensor:
    """Every rank's slice of ``t`` along ``dim``, concatenated in rank order (differentiable)."""
    return _GatherSequence.apply(t, cp, dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext | None = None,
                     method: str = "gather") -> torch.Tensor:  # fmt: skip
    """Causal SDPA of q, k, v ``[B, heads, L_r, hd]`` (this rank's slice; the whole sequence without ``cp``)."""
    if cp is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "torch":
        if not torch_cp_active():
            raise RuntimeError("attention method 'torch' needs torch's context_parallel to be active around the "
                               "model (swrgen.distributed.attention.torch_context_parallel)")  # fmt: skip
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method != "gather":
        raise ValueError(f"attention method must be 'gather' or 'torch'; got {method!r}")
    keys = gather_sequence(k, cp, dim=2)
    values = gather_sequence(v, cp, dim=2)
    start = cp.layout.start
    rows = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + start
    cols = torch.arange(keys.shape[2], device=q.device).unsqueeze(0)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=cols <= rows)


@contextlib.contextmanager
def torch_context_parallel(mesh, buffers: list[torch.Tensor], seq_dims: list[int]) -> Iterator[None]:
    """torch's ``context_parallel`` with contiguous slices (its load balancing off): ``buffers`` are sharded
    in place along ``seq_dims`` (rank r keeps the r-th equal chunk) and SDPA runs as ring attention
    inside. CUDA only (see the module docstring)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    for t, d in zip(buffers, seq_dims, strict=True):
        if t.shape[d] % mesh.size():
            raise ValueError(f"torch's ring attention needs equal slices: a buffer of length {t.shape[d]} along dim "
                             f"{d} does not split into {mesh.size()} equal parts")  # fmt: skip
    old = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = False
    try:
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=set(buffers)):
            yield
    finally:
        _cp_options.enable_load_balance = old
