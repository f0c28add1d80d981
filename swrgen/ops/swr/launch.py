"""Launch the generated forward/backward kernels on torch tensors.

Chooses the 16-byte vector kernel when every row is aligned and all sequence starts and
lengths are multiples of the lane's token count, the element-wise kernel otherwise; sizes
the grid from the spec's tuning knobs (tiles per warp, warps per CTA, cluster, persistence).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from swrgen import constants
from swrgen.runtime.driver import multiprocessor_count
from swrgen.runtime.params import KernelParams
from swrgen.runtime.program import Program


@dataclass(frozen=True)
class Packed:
    """Packed sequences of one buffer (cu_seqlens): starts and cumulative chunk counts, on device."""

    starts: list[int]  # S+1 token offsets, host copy
    seq_start: torch.Tensor  # int64 [S+1]
    seq_chunk: torch.Tensor  # int64 [S+1]
    chunks: int  # total chunks over all sequences


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def pack_sequences(program: Program, cu_seqlens: list[int], device: torch.device) -> Packed:
    t = program.spec.target
    bl = program.spec.recurrence.block_len
    counts = [ceil_div(ceil_div(e - s, bl), t.tiles_per_warp) for s, e in itertools.pairwise(cu_seqlens)]
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    return Packed(
        starts=list(cu_seqlens),
        seq_start=torch.tensor(cu_seqlens, dtype=torch.int64, device=device),
        seq_chunk=torch.tensor(cum, dtype=torch.int64, device=device),
        chunks=cum[-1],
    )


def rows_aligned(t: torch.Tensor) -> bool:
    """Every row start 16-byte aligned: the base and every row stride (of dims longer than 1)."""
    if t.data_ptr() % constants.VECTOR_BYTES:
        return False
    dims = range(t.dim() - 1)
    return all(t.shape[d] == 1 or (t.stride(d) * t.element_size()) % constants.VECTOR_BYTES == 0 for d in dims)


def use_vector_kernel(program: Program, length: int, tensors: list[torch.Tensor], phase: int = 0,
                      starts: list[int] | None = None) -> bool:  # fmt: skip
    v = constants.tokens_per_lane(program.spec.recurrence.block_len)
    if length % v or phase % v or any(s % v for s in starts or ()):
        return False
    return all(rows_aligned(t) for t in tensors)


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


def _params(program: Program, a: torch.Tensor, x: torch.Tensor, packed: Packed | None, phase: int) -> KernelParams:
    batch, heads, head_dim, length = x.shape
    t, r = program.spec.target, program.spec.recurrence
    p = KernelParams()
    p.x, p.a = x.data_ptr(), a.data_ptr()
    p.len, p.heads = length, heads
    p.rows = batch * heads * (head_dim // constants.CHANNELS_PER_WARP)
    p.tiles_per_warp = t.tiles_per_warp
    p.phase = phase
    if packed is None:
        p.chunks = ceil_div(ceil_div(length + phase, r.block_len), t.tiles_per_warp)
    else:
        p.chunks = packed.chunks
        p.num_seqs = len(packed.starts) - 1
        p.seq_start, p.seq_chunk = packed.seq_start.data_ptr(), packed.seq_chunk.data_ptr()
    p.work = p.rows * p.chunks
    p.sxb, p.sxh, p.sxc = _strides3(x)
    p.sab, p.sah, p.sac = _strides3(a)
    return p


def _stream(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # ~10x cheaper than current_stream()
    return raw(index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def launch_kernel(program: Program, name: str, x: torch.Tensor, params: KernelParams) -> None:
    """Launch entry point ``name`` of ``program`` on x's device and current stream, grid from the spec."""
    t = program.spec.target
    if params.work == 0:
        return
    kernel = program.module(x.device).kernels[name]
    kernel.launch(_grid(program, kernel, params.work, x.device), t.warps_per_cta * constants.WARP_SIZE, params,
                  _stream(x.device), t.cluster_size)  # fmt: skip


@dataclass
class _ForwardPlan:
    """Everything about a forward launch that depends on shapes and strides, not on the data."""

    kernel: object | None  # None: nothing to launch (empty input)
    grid: int
    threads: int
    cluster: int
    params: KernelParams  # pointers unset
    out_dtype: torch.dtype


_PLANS: dict[tuple, _ForwardPlan] = {}
_MAX_PLANS = 4096


def _forward_plan(program: Program, a: torch.Tensor, x: torch.Tensor, packed: Packed | None,
                  phase: int) -> _ForwardPlan:  # fmt: skip
    t = program.spec.target
    out_dtype = constants.torch_dtype(program.spec.recurrence.output_dtype)
    p = _params(program, a, x, packed, phase)
    _, heads, head_dim, length = x.shape
    p.syb, p.syh, p.syc = heads * head_dim * length, head_dim * length, length  # the output is contiguous
    if x.numel() == 0 or p.work == 0:
        return _ForwardPlan(None, 0, 0, 1, p, out_dtype)
    # The output is a fresh allocation (aligned); only the inputs decide vector vs element-wise.
    vec = use_vector_kernel(program, x.shape[-1], [x, a], phase, packed.starts if packed else None)
    kernel = program.module(x.device).kernels["swr_fwd_vec" if vec else "swr_fwd_scalar"]
    return _ForwardPlan(kernel, _grid(program, kernel, p.work, x.device), t.warps_per_cta * constants.WARP_SIZE,
                        t.cluster_size, p, out_dtype)  # fmt: skip


def forward(program: Program, a: torch.Tensor, x: torch.Tensor, poison: float | None = None,
            packed: Packed | None = None, state: torch.Tensor | None = None,
            phase: int = 0) -> torch.Tensor:  # fmt: skip
    """y [B, H, DH, L] in the spec's output dtype; inputs already validated.

    packed: sequences of a [1, H, DH, T] buffer (cu_seqlens). state: float32
    [S, H, DH, 2 + 2(k-1)] (w, g, carriers) to resume each sequence from, `phase` tokens into
    its current tile. poison (tests): fill the output first, so an unwritten element shows.
    Launch plans of unpacked calls are cached by shape, strides and alignment (small calls are
    launch-bound).
    """
    if packed is None:
        vb = constants.VECTOR_BYTES
        key = (program, x.device, x.shape, x.stride(), a.shape, a.stride(), x.data_ptr() % vb == 0,
               a.data_ptr() % vb == 0, phase)  # fmt: skip
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            plan = _PLANS[key] = _forward_plan(program, a, x, None, phase)
    else:
        plan = _forward_plan(program, a, x, packed, phase)
    y = torch.empty(x.shape, dtype=plan.out_dtype, device=x.device)
    if poison is not None:
        y.fill_(poison)
    if plan.kernel is None:
        return y
    p = KernelParams.from_buffer_copy(plan.params)
    p.x, p.a, p.y = x.data_ptr(), a.data_ptr(), y.data_ptr()
    if state is not None:
        p.state = state.data_ptr()
    plan.kernel.launch(plan.grid, plan.threads, p, _stream(x.device), plan.cluster)
    return y


def backward(program: Program, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, poison: float | None = None,
             packed: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, da) for upstream gradient dy (spec output dtype, unit stride along L); args as in forward."""
    batch, heads, head_dim, length = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    groups = head_dim // constants.CHANNELS_PER_WARP
    per_channel = a.dim() == 4
    partial = not per_channel and groups > 1  # fp32 partial per 16-channel group, summed below in a fixed order
    da_buf = torch.empty((batch, heads, head_dim if per_channel else groups, length),
                         dtype=torch.float32 if partial else a.dtype, device=x.device)  # fmt: skip
    if poison is not None:
        dx.fill_(poison)
        da_buf.fill_(poison)
    if x.numel() == 0:
        return dx, torch.zeros_like(a)
    p = _params(program, a, x, packed, 0)
    p.dy, p.dx, p.da = dy.data_ptr(), dx.data_ptr(), da_buf.data_ptr()
    p.sdyb, p.sdyh, p.sdyc = _strides3(dy)
    p.sdxb, p.sdxh, p.sdxc = _strides3(dx)
    vec = use_vector_kernel(program, length, [x, a, dy, dx], 0, packed.starts if packed else None)
    launch_kernel(program, "swr_bwd_vec" if vec else "swr_bwd_scalar", x, p)
    if per_channel:
        return dx, da_buf
    return dx, (da_buf.sum(dim=2).to(a.dtype) if partial else da_buf.squeeze(2))
