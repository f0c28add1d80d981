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
from swrgen.runtime.plan import LaunchPlan, PlanCache
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


def fresh_rows_aligned(shape: tuple[int, ...], element_size: int) -> bool:
    """``rows_aligned`` of a fresh contiguous tensor of this shape (the allocator aligns its base)."""
    stride = 1
    for d in reversed(range(len(shape))):
        if d < len(shape) - 1 and shape[d] != 1 and (stride * element_size) % constants.VECTOR_BYTES:
            return False
        stride *= shape[d]
    return True


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


def aligned(*tensors: torch.Tensor) -> bool:
    """Every base address 16-byte aligned: with the shapes and strides, all that the kernel choice reads."""
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return ptr % constants.VECTOR_BYTES == 0


def launch_plan(program: Program, name: str, device: torch.device, params: KernelParams) -> LaunchPlan | None:
    """A plan for entry point ``name`` with these params (grid from the spec); None when there is no work."""
    if params.work == 0:
        return None
    t = program.spec.target
    kernel = program.module(device).kernels[name]
    grid = _grid(program, kernel, params.work, device)
    return LaunchPlan(kernel, grid, t.warps_per_cta * constants.WARP_SIZE, t.cluster_size, params)


def cuda_device(t: torch.Tensor) -> torch.device:
    return torch.device("cuda", t.get_device())


class ForwardPlan:
    """A forward call for one input geometry: the output dtype (y is shaped like x) and the launch (None: empty)."""

    __slots__ = ("dtype", "launch")

    def __init__(self, launch: LaunchPlan | None, dtype: torch.dtype) -> None:
        self.launch, self.dtype = launch, dtype

    def run(self, a: torch.Tensor, x: torch.Tensor, poison: float | None = None, state: int = 0) -> torch.Tensor:
        # empty_like: about half the host time of torch.empty(shape, ...) (no shape argument to parse).
        y = torch.empty_like(x, dtype=self.dtype, memory_format=torch.contiguous_format)
        if poison is not None:
            y.fill_(poison)
        if self.launch is not None:
            self.launch.launch(x.data_ptr(), a.data_ptr(), y.data_ptr(), 0, 0, 0, state)
        return y


def _build_forward(program: Program, a: torch.Tensor, x: torch.Tensor, packed: Packed | None,
                   phase: int) -> ForwardPlan:  # fmt: skip
    out_dtype = constants.torch_dtype(program.spec.recurrence.output_dtype)
    device = cuda_device(x)
    p = _params(program, a, x, packed, phase)
    _, heads, head_dim, length = x.shape
    p.syb, p.syh, p.syc = heads * head_dim * length, head_dim * length, length  # the output is contiguous
    if x.numel() == 0:
        return ForwardPlan(None, out_dtype)
    # The output is a fresh allocation (aligned); only the inputs decide vector vs element-wise.
    vec = use_vector_kernel(program, x.shape[-1], [x, a], phase, packed.starts if packed else None)
    plan = launch_plan(program, "swr_fwd_vec" if vec else "swr_fwd_scalar", device, p)
    return ForwardPlan(plan, out_dtype)


_FORWARD_PLANS: PlanCache[tuple, ForwardPlan] = PlanCache(4096)


def forward_plan(program: Program, a: torch.Tensor, x: torch.Tensor, phase: int = 0) -> ForwardPlan:
    """The cached plan of an unpacked forward call: keyed by program, device, shapes, strides, dtypes, alignment."""
    key = (program, x.get_device(), x.shape, x.stride(), x.dtype, a.shape, a.stride(), a.dtype, aligned(x, a), phase)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.put(key, _build_forward(program, a, x, None, phase))
    return plan


def forward(program: Program, a: torch.Tensor, x: torch.Tensor, poison: float | None = None,
            packed: Packed | None = None, state: torch.Tensor | None = None,
            phase: int = 0) -> torch.Tensor:  # fmt: skip
    """y [B, H, DH, L] in the spec's output dtype; inputs already validated.

    packed: sequences of a [1, H, DH, T] buffer (cu_seqlens). state: float32
    [S, H, DH, 2 + 2(k-1)] (w, g, carriers) to resume each sequence from, `phase` tokens into
    its current tile. poison (tests): fill the output first, so an unwritten element shows.
    Launch plans of unpacked calls are cached (small calls are launch-bound).
    """
    plan = forward_plan(program, a, x, phase) if packed is None else _build_forward(program, a, x, packed, phase)
    return plan.run(a, x, poison, 0 if state is None else state.data_ptr())


class BackwardPlan:
    """A backward call for one geometry: the da buffer (shape, dtype, how it reduces to da; dx is shaped like x)
    and the launch (None: empty input)."""

    __slots__ = ("da_dtype", "da_shape", "launch", "reduce")

    def __init__(self, launch: LaunchPlan | None, da_shape: tuple[int, int, int, int], da_dtype: torch.dtype,
                 reduce: str) -> None:  # fmt: skip
        self.launch, self.da_shape, self.da_dtype, self.reduce = launch, da_shape, da_dtype, reduce

    def run(self, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
            poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        da_buf = x.new_empty(self.da_shape, dtype=self.da_dtype)
        if poison is not None:
            dx.fill_(poison)
            da_buf.fill_(poison)
        if self.launch is None:  # empty input
            return dx, torch.zeros_like(a)
        self.launch.launch(x.data_ptr(), a.data_ptr(), 0, dy.data_ptr(), dx.data_ptr(), da_buf.data_ptr())
        if self.reduce == "sum":  # fp32 partials per 16-channel group, summed in a fixed order
            return dx, da_buf.sum(dim=2).to(a.dtype)
        return dx, (da_buf.squeeze(2) if self.reduce == "squeeze" else da_buf)


def _build_backward(program: Program, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                    packed: Packed | None) -> BackwardPlan:  # fmt: skip
    batch, heads, head_dim, length = x.shape
    device = cuda_device(x)
    groups = head_dim // constants.CHANNELS_PER_WARP
    per_channel = a.dim() == 4
    partial = not per_channel and groups > 1  # fp32 partial per 16-channel group, summed by run()
    da_shape = (batch, heads, head_dim if per_channel else groups, length)
    da_dtype = torch.float32 if partial else a.dtype
    reduce = "none" if per_channel else ("sum" if partial else "squeeze")
    if x.numel() == 0:
        return BackwardPlan(None, da_shape, da_dtype, reduce)
    p = _params(program, a, x, packed, 0)
    p.sdyb, p.sdyh, p.sdyc = _strides3(dy)
    p.sdxb, p.sdxh, p.sdxc = heads * head_dim * length, head_dim * length, length  # dx is contiguous
    vec = use_vector_kernel(program, length, [x, a, dy], 0, packed.starts if packed else None)
    vec = vec and fresh_rows_aligned(x.shape, x.element_size())  # dx: a fresh contiguous allocation
    plan = launch_plan(program, "swr_bwd_vec" if vec else "swr_bwd_scalar", device, p)
    return BackwardPlan(plan, da_shape, da_dtype, reduce)


_BACKWARD_PLANS: PlanCache[tuple, BackwardPlan] = PlanCache(4096)


def backward_plan(program: Program, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> BackwardPlan:
    """The cached plan of an unpacked backward call (keyed like ``forward_plan``, dy's geometry included)."""
    key = (program, x.get_device(), x.shape, x.stride(), x.dtype, a.shape, a.stride(), a.dtype, dy.shape,
           dy.stride(), dy.dtype, aligned(x, a, dy))  # fmt: skip
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.put(key, _build_backward(program, a, x, dy, None))
    return plan


def backward(program: Program, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, poison: float | None = None,
             packed: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, da) for upstream gradient dy (spec output dtype, unit stride along L); args as in forward.
    Launch plans of unpacked calls are cached like the forward's."""
    plan = backward_plan(program, a, x, dy) if packed is None else _build_backward(program, a, x, dy, packed)
    return plan.run(a, x, dy, poison)
