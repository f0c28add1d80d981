"""Launch the fused Phalanx kernels (``phalanx_fwd*`` / ``phalanx_bwd*`` / ``phalanx_decode``) on torch tensors.

P needs unit stride along its last dim (dZ is copied if it lacks it); Z and dP are fresh contiguous
tensors. Packed sequences and states as in :mod:`swrgen.ops.swr.launch`; the fused kernels address every
token row on its own, so any phase keeps the 16-byte kernels.
"""

from __future__ import annotations

import torch

from swrgen import constants
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr.launch import (
    Sequences,
    StateArgs,
    aligned,
    backward_kernel,
    cached_plan,
    ceil_div,
    check_row_length,
    fresh_rows_aligned,
    geometry,
    launch_stateful,
    make_plan,
    packed_plan,
    rows_aligned,
    starts_at_tiles,
)
from swrgen.ops.swr.launch import tuning_shape as packed_tuning_shape
from swrgen.tune.buckets import bucket_of

__all__ = ["aligned", "backward", "backward_plan", "decode", "fold_shared_grads", "forward", "forward_plan",
           "packed_plan", "plain_backward", "shared_grad_buffer", "tuning_shape", "use_vector_kernel"]  # fmt: skip
from swrgen.runtime.kernels import DeviceKernels, KernelSet
from swrgen.runtime.params import KernelParams
from swrgen.runtime.plan import LaunchPlan


def _params(ks: KernelSet, P: torch.Tensor, layout: GatingLayout, decay_max: float, stateful: bool,
            packed: bool) -> KernelParams:  # fmt: skip
    if P.stride(-1) != 1:  # the kernels index columns by pointer offsets
        raise ValueError(f"P must have unit stride along its last dim; got strides {P.stride()}")
    batch, length, _ = P.shape
    check_row_length(length)
    t, r = ks.spec.target, ks.spec.recurrence
    p = KernelParams()
    p.len, p.heads = length, layout.heads
    p.rows = batch * layout.heads  # one warp per head (head_dim 16)
    p.tiles_per_warp = t.tiles_per_warp
    extra = r.block_len - 1 if stateful else 0  # a phase may add a tile (warps past it find no work)
    p.chunks = 0 if packed else max(1, ceil_div(ceil_div(length + extra, r.block_len), t.tiles_per_warp))
    p.work = p.rows * p.chunks
    p.decay_max = decay_max
    p.kv_group = layout.kv_group
    p.col_a, p.col_b, p.col_c, p.col_v = layout.col_a, layout.col_b, layout.col_c, layout.col_v
    p.spb, p.spt = P.stride(0), P.stride(1)
    return p


def tuning_shape(P: torch.Tensor, layout: GatingLayout, seqs: Sequences | None = None) -> tuple[int, int, int, int]:
    """What the tuned store buckets for the fused kernels: (B, H, 16, L), one warp row per head; a packed batch
    as a batch of its sequences (``swrgen.ops.swr.launch.tuning_shape``)."""
    return packed_tuning_shape((P.shape[0], layout.heads, layout.head_dim, P.shape[1]), seqs)


def use_vector_kernel(layout: GatingLayout, *tensors: torch.Tensor) -> bool:
    """The "vec" kernels move 16-byte chunks: 16-bit types, aligned rows, and every 16-column block of B,
    C and V starting on a 16-byte boundary (A is read one element at a time)."""
    vb = constants.VECTOR_BYTES
    if tensors[0].element_size() != 2:
        return False
    cols = (layout.col_b, layout.col_c, layout.col_v)
    return all((c * 2) % vb == 0 for c in cols) and all(rows_aligned(t) for t in tensors)


def forward_plan(ks: KernelSet, P: torch.Tensor, layout: GatingLayout, decay_max: float, seqs: Sequences | None = None,
                 state: StateArgs | None = None, want_state: bool = False) -> LaunchPlan:  # fmt: skip
    """The fused forward's launch plan for P (cached on ``ks``; the tuned variant's kernels)."""
    batch, length, _ = P.shape
    stateful = state is not None or want_state
    shape = tuning_shape(P, layout, seqs)
    packed = None if seqs is None else bucket_of(shape)  # packed: its tuning bucket
    key = ("fwd", packed, state is not None, want_state, geometry(P), layout, decay_max)

    def build(variant: KernelSet, dev: DeviceKernels) -> LaunchPlan:
        p = _params(variant, P, layout, decay_max, stateful, seqs is not None)
        p.szb, p.szt = length * layout.inner, layout.inner  # Z is a fresh contiguous tensor (aligned base)
        vec = use_vector_kernel(layout, P) and fresh_rows_aligned((batch, length, layout.inner), P.element_size())
        # The fused kernels read a state only in their *_state entry points (their plain ones start from zero).
        name = f"phalanx_fwd{'_state' if stateful else ''}_{'vec' if vec else 'scalar'}"
        return make_plan(variant, dev, name, p)

    return cached_plan(ks, P, key, "fwd", build, shape)


def forward(ks: KernelSet, P: torch.Tensor, layout: GatingLayout, decay_max: float, *,
            seqs: Sequences | None = None, state: StateArgs | None = None, want_state: bool = False,
            poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(Z [B, L, H*DH] in P's dtype, new state data, new positions; the last two only with ``want_state``).

    seqs: packed sequences of a [1, T, N] P. state: states to continue from. poison (tests): prefill outputs.
    """
    batch, length, _ = P.shape
    Z = P.new_empty((batch, length, layout.inner))
    n = batch if seqs is None else seqs.count
    state_out = pos_out = None
    if want_state:
        width = 2 * ks.spec.recurrence.window_blocks
        state_out = P.new_empty((n, layout.heads, layout.head_dim, width), dtype=torch.float32)
        pos_out = torch.empty(n, dtype=torch.int64, device=P.device)
    if poison is not None:
        Z.fill_(poison)
        if state_out is not None:
            state_out.fill_(poison)
    stateful = state is not None or want_state
    plan = forward_plan(ks, P, layout, decay_max, seqs, state, want_state)
    if not stateful and seqs is None:
        plan.launch(P.data_ptr(), 0, Z.data_ptr())
        return Z, None, None
    launch_stateful(ks, plan, P, {"x": P.data_ptr(), "y": Z.data_ptr()}, seqs, state, state_out=state_out,
                    pos_out=pos_out)  # fmt: skip
    return Z, state_out, pos_out


def backward(ks: KernelSet, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout, decay_max: float, *,
             seqs: Sequences | None = None, state: StateArgs | None = None, d_state_out: torch.Tensor | None = None,
             want_d_state: bool = False,
             poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dP [B, L, N] in P's dtype, the old state's gradient or None). Shared kv-heads: the kernel writes
    per-head dB, dC in fp32 and they are summed here over each group in a fixed order (deterministic)."""
    if dZ.stride(-1) != 1:
        dZ = dZ.contiguous()
    stateful = state is not None or d_state_out is not None
    if not stateful and seqs is None and not want_d_state and poison is None:
        return plain_backward(backward_plan(ks, P, dZ, layout, decay_max), P, dZ, layout), None
    batch, length, width = P.shape
    dP = P.new_empty((batch, length, width))
    dbc = shared_grad_buffer(P, layout)
    n = batch if seqs is None else seqs.count
    d_state = None
    if want_d_state:
        d_state = P.new_empty((n, layout.heads, layout.head_dim, 2 * ks.spec.recurrence.window_blocks),
                              dtype=torch.float32)  # fmt: skip
    if poison is not None:
        for t in (dP, dbc, d_state):
            if t is not None:
                t.fill_(poison)
    plan = backward_plan(ks, P, dZ, layout, decay_max, seqs, stateful, state)
    dbc_ptr = 0 if dbc is None else dbc.data_ptr()
    if not stateful and seqs is None:  # dense, into poisoned buffers or with an (unwritten) d_state
        plan.launch(x=P.data_ptr(), dy=dZ.data_ptr(), dx=dP.data_ptr(), dbc=dbc_ptr)
    else:
        fields = {"x": P.data_ptr(), "dy": dZ.data_ptr(), "dx": dP.data_ptr(), "dbc": dbc_ptr}
        launch_stateful(ks, plan, P, fields, seqs, state, dstate_out=d_state_out, dstate=d_state)
    fold_shared_grads(dP, dbc, layout)
    return dP, d_state


def backward_plan(ks: KernelSet, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout, decay_max: float,
                  seqs: Sequences | None = None, stateful: bool = False,
                  state: StateArgs | None = None) -> LaunchPlan:  # fmt: skip
    """The fused backward's launch plan (cached on ``ks``); ``stateful``: a state in or out (``state``: the
    one read, if any)."""
    batch, length, width = P.shape
    shape = tuning_shape(P, layout, seqs)
    packed = None if seqs is None else bucket_of(shape)  # packed: its tuning bucket
    at_tiles = stateful and starts_at_tiles(ks.spec.recurrence.block_len, state)
    key = ("bwd", packed, stateful, at_tiles, geometry(P, dZ), layout, decay_max)

    def build(variant: KernelSet, dev: DeviceKernels) -> LaunchPlan:
        p = _params(variant, P, layout, decay_max, stateful, seqs is not None)
        p.sdzb, p.sdzt = dZ.stride(0), dZ.stride(1)
        p.sdpb, p.sdpt = length * width, width  # dP is a fresh contiguous tensor (aligned base)
        vec = use_vector_kernel(layout, P, dZ) and fresh_rows_aligned((batch, length, width), P.element_size())
        return make_plan(variant, dev, backward_kernel("phalanx", stateful, at_tiles, vec), p)

    return cached_plan(ks, P, key, "bwd", build, shape)


def plain_backward(plan: LaunchPlan, P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout) -> torch.Tensor:
    """dP of a call without a state by its :func:`backward_plan` (a packed layout's through ``packed_plan``):
    fresh buffers, one launch (``backward`` and a training call's backward both end here)."""
    dP = P.new_empty(P.shape)
    dbc = shared_grad_buffer(P, layout)
    plan.launch(x=P.data_ptr(), dy=dZ.data_ptr(), dx=dP.data_ptr(), dbc=0 if dbc is None else dbc.data_ptr())
    fold_shared_grads(dP, dbc, layout)
    return dP


def shared_grad_buffer(P: torch.Tensor, layout: GatingLayout) -> torch.Tensor | None:
    """Shared kv-heads: where the kernel writes per-head dB, dC (fp32 [B, L, 2, H, DH]); else None (the
    kernel writes them into dP)."""
    if layout.kv_group == 1:
        return None
    return P.new_empty((P.shape[0], P.shape[1], 2, layout.heads, layout.head_dim), dtype=torch.float32)


def fold_shared_grads(dP: torch.Tensor, dbc: torch.Tensor | None, layout: GatingLayout) -> None:
    """Sum :func:`shared_grad_buffer`'s per-head dB, dC over each kv-group into dP, in a fixed order
    (deterministic)."""
    if dbc is None:
        return
    batch, length = dP.shape[:2]
    kv = layout.kv_heads * layout.head_dim
    sums = dbc.view(batch, length, 2, layout.kv_heads, layout.kv_group, layout.head_dim).sum(4)
    dP[..., layout.col_b : layout.col_b + kv] = sums[:, :, 0].reshape(batch, length, kv)
    dP[..., layout.col_c : layout.col_c + kv] = sums[:, :, 1].reshape(batch, length, kv)


def decode(ks: KernelSet, P: torch.Tensor, layout: GatingLayout, decay_max: float, data: torch.Tensor,
           pos: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One token per sequence: Z [B, H*DH] from P [B, N]; ``data`` (float32 [S, H, DH, 2 + 2(k-1)]) is
    updated in place at rows ``index`` (int64 [B], or 0..B-1); ``pos`` (int64 [S]) is read, not advanced."""
    batch = P.shape[0]
    Z = P.new_empty((batch, layout.inner))
    key = ("decode", geometry(P), layout, decay_max)

    def build(variant: KernelSet, dev: DeviceKernels) -> LaunchPlan:
        p = KernelParams()
        p.heads, p.rows, p.decay_max, p.kv_group = layout.heads, batch * layout.heads, decay_max, layout.kv_group
        p.col_a, p.col_b, p.col_c, p.col_v = layout.col_a, layout.col_b, layout.col_c, layout.col_v
        p.spb, p.szb = P.stride(0), layout.inner
        p.work = p.rows * layout.head_dim  # one thread per (sequence, head, channel)
        kernel = dev.kernels["phalanx_decode"]
        grid = ceil_div(p.work, constants.DECODE_THREADS)
        return LaunchPlan(kernel, grid, constants.DECODE_THREADS, 1, p)

    plan = cached_plan(ks, P, key, "fwd", build, (batch, layout.heads, layout.head_dim, 1))
    if batch:
        fields = {"x": P.data_ptr(), "y": Z.data_ptr(), "state": data.data_ptr(), "pos": pos.data_ptr()}
        if index is not None:
            fields["state_index"] = index.data_ptr()
        plan.launch_fields(fields)
    return Z
