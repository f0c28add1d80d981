"""Launch the fused Phalanx kernels (``phalanx_fwd_*`` / ``phalanx_bwd_*``) on torch tensors.

P needs unit stride along its last dim (dZ is copied if it lacks it); Z and dP are fresh contiguous tensors.
"""

from __future__ import annotations

import torch

from swrgen import constants
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr.launch import aligned, ceil_div, cuda_device, fresh_rows_aligned, launch_plan, rows_aligned
from swrgen.runtime.params import KernelParams
from swrgen.runtime.plan import LaunchPlan, PlanCache
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


class ForwardPlan:
    """A fused forward call for one geometry of P: Z's shape (dtype and device: P's) and the launch."""

    __slots__ = ("launch", "shape")

    def __init__(self, launch: LaunchPlan | None, shape: tuple[int, int, int]) -> None:
        self.launch, self.shape = launch, shape

    def run(self, P: torch.Tensor, poison: float | None = None) -> torch.Tensor:
        Z = P.new_empty(self.shape)  # P's dtype and device; a tuple shape parses faster than a torch.Size
        if poison is not None:
            Z.fill_(poison)
        if self.launch is not None:
            self.launch.launch(P.data_ptr(), 0, Z.data_ptr())
        return Z


def _build_forward(program: Program, P: torch.Tensor, layout: GatingLayout, decay_max: float) -> ForwardPlan:
    batch, length, _ = P.shape
    shape = (batch, length, layout.inner)
    p = _params(program, P, layout, decay_max)
    p.szb, p.szt = length * layout.inner, layout.inner  # Z is a fresh contiguous tensor (aligned base)
    vec = use_vector_kernel(layout, P) and fresh_rows_aligned(shape, P.element_size())
    device = cuda_device(P)
    plan = launch_plan(program, "phalanx_fwd_vec" if vec else "phalanx_fwd_scalar", device, p)
    return ForwardPlan(plan, shape)


_FORWARD_PLANS: PlanCache[tuple, ForwardPlan] = PlanCache(4096)


def forward_plan(program: Program, P: torch.Tensor, layout: GatingLayout, decay_max: float) -> ForwardPlan:
    """The cached plan: keyed by program, P's device, shape, strides, dtype and alignment, layout and decay_max."""
    key = (program, P.get_device(), P.shape, P.stride(), P.dtype, aligned(P), layout, decay_max)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.put(key, _build_forward(program, P, layout, decay_max))
    return plan


def forward(program: Program, P: torch.Tensor, layout: GatingLayout, decay_max: float,
            poison: float | None = None) -> torch.Tensor:  # fmt: skip
    """Z [B, L, H*DH] in P's dtype; inputs already validated. poison (tests): prefill Z."""
    return forward_plan(program, P, layout, decay_max).run(P, poison)


class BackwardPlan:
    """A fused backward call for one geometry of P and dZ: dP (and the fp32 dB, dC of shared kv-heads), the launch."""

    __slots__ = ("dbc_shape", "launch", "layout", "shape")

    def __init__(self, launch: LaunchPlan | None, shape: tuple[int, int, int], dbc_shape: tuple[int, ...] | None,
                 layout: GatingLayout) -> None:  # fmt: skip
        self.launch, self.shape, self.dbc_shape, self.layout = launch, shape, dbc_shape, layout

    def run(self, P: torch.Tensor, dZ: torch.Tensor, poison: float | None = None) -> torch.Tensor:
        """dZ: unit stride along its last dim (``backward`` makes it so)."""
        dP = P.new_empty(self.shape)
        dbc = None if self.dbc_shape is None else P.new_empty(self.dbc_shape, dtype=torch.float32)
        if poison is not None:
            dP.fill_(poison)
            if dbc is not None:
                dbc.fill_(poison)
        if self.launch is None:
            return dP
        self.launch.launch(x=P.data_ptr(), dy=dZ.data_ptr(), dx=dP.data_ptr(), dbc=0 if dbc is None else dbc.data_ptr())
        if dbc is not None:  # per-head dB, dC summed over each kv-group in a fixed order (deterministic)
            layout = self.layout
            batch, length, _ = self.shape
            kv = layout.kv_heads * layout.head_dim
            sums = dbc.view(batch, length, 2, layout.kv_heads, layout.kv_group, layout.head_dim).sum(4)
            dP[..., layout.col_b : layout.col_b + kv] = sums[:, :, 0].reshape(batch, length, kv)
            dP[..., layout.col_c : layout.col_c + kv] = sums[:, :, 1].reshape(batch, length, kv)
        return dP


def _build_backward(program: Program, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout,
                    decay_max: float) -> BackwardPlan:  # fmt: skip
    batch, length, width = P.shape
    shape = (batch, length, width)
    dbc_shape = (batch, length, 2, layout.heads, layout.head_dim) if layout.kv_group > 1 else None
    p = _params(program, P, layout, decay_max)
    p.sdzb, p.sdzt = dZ.stride(0), dZ.stride(1)
    p.sdpb, p.sdpt = length * width, width  # dP is a fresh contiguous tensor (aligned base)
    vec = use_vector_kernel(layout, P, dZ) and fresh_rows_aligned(shape, P.element_size())
    device = cuda_device(P)
    plan = launch_plan(program, "phalanx_bwd_vec" if vec else "phalanx_bwd_scalar", device, p)
    return BackwardPlan(plan, shape, dbc_shape, layout)


_BACKWARD_PLANS: PlanCache[tuple, BackwardPlan] = PlanCache(4096)


def backward_plan(program: Program, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout,
                  decay_max: float) -> BackwardPlan:  # fmt: skip
    """The cached plan (keyed like ``forward_plan``, dZ's geometry included); dZ needs unit stride along L."""
    key = (program, P.get_device(), P.shape, P.stride(), P.dtype, dZ.shape, dZ.stride(), aligned(P, dZ), layout,
           decay_max)  # fmt: skip
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.put(key, _build_backward(program, P, dZ, layout, decay_max))
    return plan


def backward(program: Program, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout, decay_max: float,
             poison: float | None = None) -> torch.Tensor:  # fmt: skip
    """dP [B, L, N] in P's dtype. Shared kv-heads: the kernel writes per-head dB, dC in fp32 and they are
    summed here over each group in a fixed order (deterministic)."""
    if dZ.stride(-1) != 1:
        dZ = dZ.contiguous()
    return backward_plan(program, P, dZ, layout, decay_max).run(P, dZ, poison)
