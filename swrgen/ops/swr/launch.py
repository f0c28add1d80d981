"""Launch the generated forward/backward kernels on torch tensors.

Chooses the 16-byte vector kernel when every row is aligned and L is a multiple of
the lane's token count, the element-wise kernel otherwise; sizes the grid from the
spec's tuning knobs (tiles per warp, warps per CTA, cluster, persistence).
"""

from __future__ import annotations

import torch

from swrgen import constants
from swrgen.runtime.driver import multiprocessor_count
from swrgen.runtime.params import KernelParams
from swrgen.runtime.program import Program


def _rows_aligned(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Every row start 16-byte aligned: the base and every row stride (of dims longer than 1)."""
    if t.data_ptr() % constants.VECTOR_BYTES:
        return False
    return all(t.shape[d] == 1 or (t.stride(d) * t.element_size()) % constants.VECTOR_BYTES == 0 for d in dims)


def use_vector_kernel(program: Program, length: int, tensors: list[torch.Tensor]) -> bool:
    if length % constants.tokens_per_lane(program.spec.recurrence.block_len):
        return False
    return all(_rows_aligned(t, tuple(range(t.dim() - 1))) for t in tensors)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, channel) element strides; a per-head gate has no channel dim."""
    if t is None:
        return (0, 0, 0)
    if t.dim() == 3:
        return (t.stride(0), t.stride(1), 0)
    return (t.stride(0), t.stride(1), t.stride(2))


def _grid(program: Program, kernel, work: int, device: torch.device) -> int:
    t = program.spec.target
    threads = t.warps_per_cta * constants.WARP_SIZE
    ctas = -(-work // t.warps_per_cta)
    if t.persistent:
        per_sm = max(1, kernel.max_active_ctas_per_sm(threads))
        ctas = min(ctas, per_sm * multiprocessor_count(device.index or 0))
    return -(-ctas // t.cluster_size) * t.cluster_size  # whole clusters; spare warps find no work


def _launch(program: Program, name: str, x: torch.Tensor, params: KernelParams) -> None:
    t, r = program.spec.target, program.spec.recurrence
    kernel = program.module(x.device).kernels[name]
    num_tiles = -(-x.shape[-1] // r.block_len)
    work = params.rows * -(-num_tiles // t.tiles_per_warp)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    kernel.launch(_grid(program, kernel, work, x.device), t.warps_per_cta * constants.WARP_SIZE, params, stream,
                  t.cluster_size)  # fmt: skip


def _base_params(program: Program, a: torch.Tensor, x: torch.Tensor) -> KernelParams:
    batch, heads, head_dim, length = x.shape
    p = KernelParams()
    p.x, p.a = x.data_ptr(), a.data_ptr()
    p.len, p.heads = length, heads
    p.rows = batch * heads * (head_dim // constants.CHANNELS_PER_WARP)
    p.tiles_per_warp = program.spec.target.tiles_per_warp
    p.sxb, p.sxh, p.sxc = _strides3(x)
    p.sab, p.sah, p.sac = _strides3(a)
    return p


def forward(program: Program, a: torch.Tensor, x: torch.Tensor, poison: float | None = None) -> torch.Tensor:
    """y [B, H, DH, L] in the spec's output dtype; inputs already validated.

    ``poison`` (tests): fill the output with this value first, so an element the kernel
    fails to write shows up.
    """
    out_dtype = constants.torch_dtype(program.spec.recurrence.output_dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if poison is not None:
        y.fill_(poison)
    if y.numel() == 0:
        return y
    p = _base_params(program, a, x)
    p.y = y.data_ptr()
    p.syb, p.syh, p.syc = _strides3(y)
    vec = use_vector_kernel(program, x.shape[-1], [x, a, y])
    _launch(program, "swr_fwd_vec" if vec else "swr_fwd_scalar", x, p)
    return y


def backward(program: Program, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
             poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, da) for upstream gradient dy (spec output dtype, unit stride along L); ``poison`` as in forward."""
    batch, heads, head_dim, length = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    groups = head_dim // constants.CHANNELS_PER_WARP
    per_channel = a.dim() == 4
    # fp32 partials: per channel, or per 16-channel group of a head (summed below, in a fixed order).
    da32 = torch.empty((batch, heads, head_dim if per_channel else groups, length), dtype=torch.float32,
                       device=x.device)  # fmt: skip
    if poison is not None:
        dx.fill_(poison)
        da32.fill_(poison)
    if x.numel() == 0:
        return dx, torch.zeros_like(a)
    p = _base_params(program, a, x)
    p.dy, p.dx, p.da = dy.data_ptr(), dx.data_ptr(), da32.data_ptr()
    p.sdyb, p.sdyh, p.sdyc = _strides3(dy)
    p.sdxb, p.sdxh, p.sdxc = _strides3(dx)
    vec = use_vector_kernel(program, length, [x, a, dy, dx])
    _launch(program, "swr_bwd_vec" if vec else "swr_bwd_scalar", x, p)
    da = da32 if per_channel else da32.sum(dim=2) if groups > 1 else da32.squeeze(2)
    return dx, da.to(a.dtype)
