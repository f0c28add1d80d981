"""Launch the fused Phalanx kernels (``phalanx_fwd_*`` / ``phalanx_bwd_*``) on torch tensors.

P needs unit stride along its last dim (dZ is copied if it lacks it); Z and dP are fresh contiguous tensors.
"""

from __future__ import annotations

import torch

from swrgen import constants
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr.launch import ceil_div, launch_kernel, rows_aligned
from swrgen.runtime.params import KernelParams
from swrgen.runtime.program import Program


def _params(program: Program, P: torch.Tensor, layout: GatingLayout, decay_max: float) -> KernelParams:
    if P.stride(-1) != 1:  # the kernels index columns by pointer offsets
        raise ValueError(f"P must have unit stride along its last dim; got strides {P.stride()}")
    batch, length, _ = P.shape
    t, r = program.spec.target, program.spec.recurrence
    p = KernelParams()
    p.x = P.data_ptr()
    p.len, p.heads = length, layout.heads
    p.rows = batch * layout.heads  # one warp per head (head_dim 16)
    p.tiles_per_warp = t.tiles_per_warp
    p.chunks = ceil_div(ceil_div(length, r.block_len), t.tiles_per_warp)
    p.work = p.rows * p.chunks
    p.decay_max = decay_max
    p.kv_group = layout.kv_group
    p.col_a, p.col_b, p.col_c, p.col_v = layout.col_a, layout.col_b, layout.col_c, layout.col_v
    p.spb, p.spt = P.stride(0), P.stride(1)
    return p


def use_vector_kernel(layout: GatingLayout, *tensors: torch.Tensor) -> bool:
    """The "vec" kernels move 16-byte chunks: 16-bit types, aligned rows, and every 16-column block of B,
    C and V starting on a 16-byte boundary (A is read one element at a time)."""
    vb = constants.VECTOR_BYTES
    if tensors[0].element_size() != 2:
        return False
    cols = (layout.col_b, layout.col_c, layout.col_v)
    return all((c * 2) % vb == 0 for c in cols) and all(rows_aligned(t) for t in tensors)


def forward(program: Program, P: torch.Tensor, layout: GatingLayout, decay_max: float,
            poison: float | None = None) -> torch.Tensor:  # fmt: skip
    """Z [B, L, H*DH] in P's dtype; inputs already validated. poison (tests): prefill Z."""
    batch, length, _ = P.shape
    Z = torch.empty((batch, length, layout.inner), dtype=P.dtype, device=P.device)
    if poison is not None:
        Z.fill_(poison)
    p = _params(program, P, layout, decay_max)
    p.y = Z.data_ptr()
    p.szb, p.szt = Z.stride(0), Z.stride(1)
    launch_kernel(program, "phalanx_fwd_vec" if use_vector_kernel(layout, P, Z) else "phalanx_fwd_scalar", P, p)
    return Z


def backward(program: Program, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout, decay_max: float,
             poison: float | None = None) -> torch.Tensor:  # fmt: skip
    """dP [B, L, N] in P's dtype. Shared kv-heads: the kernel writes per-head dB, dC in fp32 and they are
    summed here over each group in a fixed order (deterministic)."""
    batch, length, width = P.shape
    dP = torch.empty((batch, length, width), dtype=P.dtype, device=P.device)
    shared = layout.kv_group > 1
    dbc = (torch.empty((batch, length, 2, layout.heads, layout.head_dim), dtype=torch.float32, device=P.device)
           if shared else None)  # fmt: skip
    if poison is not None:
        dP.fill_(poison)
        if dbc is not None:
            dbc.fill_(poison)
    p = _params(program, P, layout, decay_max)
    if dZ.stride(-1) != 1:
        dZ = dZ.contiguous()
    p.dy, p.sdzb, p.sdzt = dZ.data_ptr(), dZ.stride(0), dZ.stride(1)
    p.dx, p.sdpb, p.sdpt = dP.data_ptr(), dP.stride(0), dP.stride(1)
    if dbc is not None:
        p.dbc = dbc.data_ptr()
    launch_kernel(program, "phalanx_bwd_vec" if use_vector_kernel(layout, P, dZ, dP) else "phalanx_bwd_scalar", P, p)
    if dbc is not None:
        kv = layout.kv_heads * layout.head_dim
        sums = dbc.view(batch, length, 2, layout.kv_heads, layout.kv_group, layout.head_dim).sum(4)
        dP[..., layout.col_b : layout.col_b + kv] = sums[:, :, 0].reshape(batch, length, kv)
        dP[..., layout.col_c : layout.col_c + kv] = sums[:, :, 1].reshape(batch, length, kv)
    return dP
