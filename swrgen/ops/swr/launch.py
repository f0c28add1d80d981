"""Launch the generated SWR kernels on torch tensors (inputs already validated).

Chooses the 16-byte vector kernel when every row is aligned and every sequence start, length and phase is
a multiple of the lane's token count, the element-wise kernel otherwise; sizes the grid from the kernel
set's tuning knobs (tiles per warp, warps per CTA, cluster, persistence). Plans (kernel, grid, the
params struct) are kept per geometry on the kernel set's device entry (``DeviceKernels.plans``); the
plan of a kernel set that resolves tuned knobs embeds the tuned variant's kernels. The fused Phalanx op's
launcher (``swrgen.ops.phalanx.launch``) builds on the same helpers: ``Sequences``, ``StateArgs``,
``cached_plan``, ``geometry``, ``launch_stateful`` and the alignment checks.

Streaming state: ``StateArgs`` carries a state's data (float32 ``[N', H, DH, 2 + 2(k-1)]``), positions
(int64 ``[N']``), an optional row index (slots of a pool) and the phases when the host knows them. The
``*_state`` kernels continue from it and write the new state (forward), or hand back the gradient of the
old state given that of the new one (backward); where every phase is known and 0, the backward's
``*_state_aligned_vec`` kernel, which reads no phase (``starts_at_tiles``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from swrgen import constants
from swrgen.runtime.kernels import DeviceKernels, KernelSet
from swrgen.runtime.params import KernelParams
from swrgen.runtime.plan import LaunchPlan, current_stream, grid_for
from swrgen.tune.buckets import bucket_of


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


class Sequences:
    """Packed sequences of one buffer (``cu_seqlens``, checked): host offsets and their device copies.

    Made once per layout (``REGISTRY.layouts`` keeps those given as host ints); the device copies (one pinned,
    asynchronous upload each) are memoized on it, so a backward, another layer or a later step with the same
    layout uploads nothing. The copies are per device and stream: a copy is only read on the stream that
    allocated it, so its memory goes back to the allocator in that stream's order, whenever it is dropped.
    """

    __slots__ = ("_chunks", "_device_starts", "count", "starts")

    def __init__(self, starts: list[int]) -> None:
        self.starts = tuple(starts)
        self.count = len(self.starts) - 1  # sequences
        self._device_starts: dict[tuple, torch.Tensor] = {}
        self._chunks: dict[tuple, tuple[int, torch.Tensor]] = {}

    @property
    def lengths(self) -> list[int]:
        return [e - s for s, e in itertools.pairwise(self.starts)]

    def device_starts(self, device: torch.device) -> torch.Tensor:
        where = on_stream(device)
        t = self._device_starts.get(where)
        if t is None:
            t = self._device_starts[where] = upload(list(self.starts), device)
        return t

    def chunk_offsets(self, device: torch.device, block_len: int, tiles_per_warp: int,
                      phases: tuple[int, ...] | None) -> tuple[int, torch.Tensor]:  # fmt: skip
        """(total chunks, int64 [S+1] cumulative chunk counts): each sequence's tiles in chunks of
        ``tiles_per_warp``, at least one (its state goes through even when it is empty). Unknown phases
        (None) count one more tile per sequence: enough for any phase."""
        key = (on_stream(device), block_len, tiles_per_warp, phases)
        hit = self._chunks.get(key)
        if hit is None:
            cum = [0]
            for i, n in enumerate(self.lengths):
                extra = phases[i] if phases is not None else block_len - 1
                cum.append(cum[-1] + max(1, ceil_div(ceil_div(n + extra, block_len), tiles_per_warp)))
            hit = self._chunks[key] = (cum[-1], upload(cum, device))
        return hit


def on_stream(device: torch.device) -> tuple:
    """(device, its current stream): where a memoized device copy may be read."""
    return (device, current_stream(device.index) if device.type == "cuda" else 0)


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 values on ``device`` through pinned memory: no synchronisation with the device's queue."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class StateArgs:
    """A state for the kernels: data float32 contiguous [N', H, DH, 2 + 2(k-1)], pos int64 [N'], rows of the
    N sequences in them (``index`` int64 [N], or None: row n), and the N phases (pos % BL) when known."""

    data: torch.Tensor
    pos: torch.Tensor
    index: torch.Tensor | None = None
    phases: tuple[int, ...] | None = None


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


def aligned(*tensors: torch.Tensor) -> bool:
    """Every base address 16-byte aligned: with the shapes and strides, all that the kernel choice reads."""
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return ptr % constants.VECTOR_BYTES == 0


def offsets_fit_vectors(block_len: int, length: int, seqs: Sequences | None, state: StateArgs | None) -> bool:
    """Whether every sequence start, length and phase is a multiple of a lane's token count (the vector
    kernels move whole lane vectors); unknown phases do not fit."""
    v = constants.tokens_per_lane(block_len)
    if length % v or (seqs is not None and any(s % v for s in seqs.starts)):
        return False
    return state is None or (state.phases is not None and not any(ph % v for ph in state.phases))


def starts_at_tiles(block_len: int, state: StateArgs | None) -> bool:
    """Whether every sequence starts at a tile (no state, or phases known on the host and all 0): the state
    backward then runs ``swr_bwd_state_aligned_vec``, which reads no phase."""
    return state is None or (state.phases is not None and not any(ph % block_len for ph in state.phases))


def backward_kernel(op: str, stateful: bool, at_tiles: bool, vec: bool) -> str:
    """The backward entry point of ``op`` ("swr" or "phalanx"): plain, ``_state``, or, for the vector kernel of
    a state call whose sequences all start at a tile (:func:`starts_at_tiles`), ``_state_aligned``."""
    kind = ("_state_aligned" if at_tiles and vec else "_state") if stateful else ""
    return f"{op}_bwd{kind}_{'vec' if vec else 'scalar'}"


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, channel) element strides; a per-head gate has no channel dim."""
    if t is None:
        return (0, 0, 0)
    if t.dim() == 3:
        return (t.stride(0), t.stride(1), 0)
    return (t.stride(0), t.stride(1), t.stride(2))


def make_plan(ks: KernelSet, dev: DeviceKernels, name: str, params: KernelParams) -> LaunchPlan:
    """A plan for entry point ``name`` of ``ks`` on ``dev`` with these params (grid from the spec's knobs)."""
    t = ks.spec.target
    kernel = dev.kernels[name]
    threads = t.warps_per_cta * constants.WARP_SIZE
    cap = None
    if t.persistent:
        cap = max(1, kernel.max_active_ctas_per_sm(threads)) * dev.multiprocessors
    grid = grid_for(params.work, t.warps_per_cta, t.cluster_size, cap)
    return LaunchPlan(kernel, grid, threads, t.cluster_size, params, grid_cap=cap)


def check_row_length(length: int) -> None:
    """The kernels index a row's tokens in 32 bits (``tok_t``): rows up to ``MAX_SEQUENCE_TOKENS`` tokens
    (a packed buffer's whole row, so every sequence in it too)."""
    if length > constants.MAX_SEQUENCE_TOKENS:
        raise ValueError(f"a row of {length} tokens is longer than the CUDA kernels take "
                         f"({constants.MAX_SEQUENCE_TOKENS}: token indices are 32-bit); split it into "
                         "chunks and hand the state over (initial_state / return_state)")  # fmt: skip


def _params(ks: KernelSet, a: torch.Tensor, x: torch.Tensor, seqs: Sequences | None,
            state: StateArgs | None) -> KernelParams:  # fmt: skip
    batch, heads, head_dim, length = x.shape
    check_row_length(length)
    t, r = ks.spec.target, ks.spec.recurrence
    p = KernelParams()
    p.len, p.heads = length, heads
    p.rows = batch * heads * (head_dim // constants.CHANNELS_PER_WARP)
    p.tiles_per_warp = t.tiles_per_warp
    if seqs is None:  # dense: every row the same length; a phase may add a tile (warps past it find no work)
        extra = r.block_len - 1 if state is not None else 0
        p.chunks = max(1, ceil_div(ceil_div(length + extra, r.block_len), t.tiles_per_warp))
    else:
        p.chunks = 0  # set per call (packed: chunks over all sequences)
    p.work = p.rows * p.chunks
    p.sxb, p.sxh, p.sxc = _strides3(x)
    p.sab, p.sah, p.sac = _strides3(a)
    return p


def _state_fields(state: StateArgs | None) -> dict[str, int]:
    if state is None:
        return {}
    out = {"state": state.data.data_ptr(), "pos": state.pos.data_ptr()}
    if state.index is not None:
        out["state_index"] = state.index.data_ptr()
    return out


def _packed_fields(ks: KernelSet, x: torch.Tensor, seqs: Sequences, state: StateArgs | None,
                   plan: LaunchPlan) -> tuple[dict[str, int], int]:  # fmt: skip
    """The packed batch's fields and work items for ``plan``. The chunks are cut with the plan's own
    ``tiles_per_warp`` (a tuned variant's may differ from ``ks``'s), the count each warp's kernel walks."""
    phases = (0,) * seqs.count if state is None else state.phases  # no state: every sequence starts a tile
    p = plan.params
    total, offsets = seqs.chunk_offsets(x.device, ks.spec.recurrence.block_len, p.tiles_per_warp, phases)
    fields = {"seq_start": seqs.device_starts(x.device).data_ptr(), "seq_chunk": offsets.data_ptr(),
              "num_seqs": seqs.count, "chunks": total}  # fmt: skip
    return fields, p.rows * total


def packed_plan(ks: KernelSet, plan: LaunchPlan, t: torch.Tensor, seqs: Sequences | None) -> LaunchPlan:
    """``plan`` (a call's without a state) with the fields of one packed layout fixed: its offsets' device
    copies on ``t``'s device and current stream, its chunks, its grid; without ``seqs`` (dense) the plan
    itself. A remembered packed call launches it like a dense plan; whoever keeps it keeps ``seqs`` too (the
    copies its pointers name)."""
    if seqs is None:
        return plan
    fields, work = _packed_fields(ks, t, seqs, None, plan)
    return plan.with_fields(fields, work)


def launch_stateful(ks: KernelSet, plan: LaunchPlan, t: torch.Tensor, fields: dict[str, int], seqs: Sequences | None,
                    state: StateArgs | None, **buffers: torch.Tensor | None) -> None:  # fmt: skip
    """Launch ``plan`` (a packed or state-carrying call: all but the plain path) with the data pointers in
    ``fields``, the state's, the packed batch's (``t``: the input whose device holds them) and those of
    ``buffers`` (``state_out``, ``pos_out``, ``dstate_out``, ``dstate``; None: a null pointer)."""
    fields = {**fields, **_state_fields(state)}
    fields.update({name: b.data_ptr() for name, b in buffers.items() if b is not None})
    work = None
    if seqs is not None:
        packed, work = _packed_fields(ks, t, seqs, state, plan)
        fields.update(packed)
    plan.launch_fields(fields, work)


def tuning_shape(shape: tuple[int, int, int, int], seqs: Sequences | None) -> tuple[int, int, int, int]:
    """What the tuned store buckets a call by: x's [B, H, DH, L]; a packed batch of S sequences as a batch of
    S sequences of their mean length (its warps walk sequences that long, not the whole buffer)."""
    if seqs is None or seqs.count == 0:
        return shape
    return (seqs.count, shape[1], shape[2], max(1, shape[3] // seqs.count))


def cached_plan(ks: KernelSet, x: torch.Tensor, key: tuple, direction: str, build,
          shape: tuple[int, int, int, int] | None = None) -> LaunchPlan:  # fmt: skip
    """The cached plan of ``ks`` for ``key`` on x's device, made by ``build(variant, dev)`` on a miss from
    the variant tuned for ``shape`` (what the tuned store buckets; x's shape by default)."""
    dev = ks.on(x.get_device())
    plan = dev.plans.get(key)
    if plan is None:
        variant = ks.for_shape(dev.index, shape or tuple(x.shape), direction)
        plan = build(variant, variant.on(dev.index))
        if ks.caching:
            dev.plans.put(key, plan)
    return plan


def geometry(*tensors: torch.Tensor) -> tuple:
    """What the checks and a plan read from tensors: shapes, strides, dtypes, whether all bases are aligned."""
    out: list = [aligned(*tensors)]
    for t in tensors:
        out += [t.shape, t.stride(), t.dtype]
    return tuple(out)


# ---------------------------------------------------------------- forward


def forward_plan(ks: KernelSet, a: torch.Tensor, x: torch.Tensor, seqs: Sequences | None = None,
                 state: StateArgs | None = None, want_state: bool = False) -> LaunchPlan:  # fmt: skip
    """The forward's launch plan for these inputs (cached on ``ks``; the tuned variant's kernels)."""
    vec = offsets_fit_vectors(ks.spec.recurrence.block_len, x.shape[-1], seqs, state)
    packed = None if seqs is None else bucket_of(tuning_shape(tuple(x.shape), seqs))  # packed: its tuning bucket
    key = ("fwd", packed, state is not None, want_state, vec, geometry(x, a))

    def build(variant: KernelSet, dev: DeviceKernels) -> LaunchPlan:
        p = _params(variant, a, x, seqs, state)
        _, heads, head_dim, length = x.shape
        p.syb, p.syh, p.syc = heads * head_dim * length, head_dim * length, length  # y is contiguous
        use_vec = vec and rows_aligned(x) and rows_aligned(a)  # y is fresh: aligned
        # A state is read only by the *_state entry points (the plain ones start from zero at a tile).
        name = f"swr_fwd{'_state' if state is not None or want_state else ''}_{'vec' if use_vec else 'scalar'}"
        return make_plan(variant, dev, name, p)

    return cached_plan(ks, x, key, "fwd", build, tuning_shape(tuple(x.shape), seqs))


def forward(ks: KernelSet, a: torch.Tensor, x: torch.Tensor, *, seqs: Sequences | None = None,
            state: StateArgs | None = None, want_state: bool = False,
            poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(y [B, H, DH, L] in the spec's output dtype, new state data, new positions) — the last two only with
    ``want_state`` (float32 [N, H, DH, 2 + 2(k-1)], int64 [N]; N = B, or the packed sequences).

    seqs: the packed sequences of a [1, H, DH, T] buffer. state: the states to continue from. poison
    (tests): fill the outputs first, so an unwritten element shows.
    """
    r = ks.spec.recurrence
    out_dtype = constants.torch_dtype(r.output_dtype)
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    n = x.shape[0] if seqs is None else seqs.count
    state_out = pos_out = None
    if want_state:
        state_out = x.new_empty((n, x.shape[1], x.shape[2], 2 * r.window_blocks), dtype=torch.float32)
        pos_out = torch.empty(n, dtype=torch.int64, device=x.device)
    if poison is not None:
        y.fill_(poison)
        if state_out is not None:
            state_out.fill_(poison)
    if x.numel() == 0 and not want_state:
        return y, state_out, pos_out
    stateful = state is not None or want_state
    plan = forward_plan(ks, a, x, seqs, state, want_state)
    if not stateful and seqs is None:
        plan.launch(x.data_ptr(), a.data_ptr(), y.data_ptr())
        return y, None, None
    launch_stateful(ks, plan, x, {"x": x.data_ptr(), "a": a.data_ptr(), "y": y.data_ptr()}, seqs, state,
                    state_out=state_out, pos_out=pos_out)  # fmt: skip
    return y, state_out, pos_out


# ---------------------------------------------------------------- backward


def backward(ks: KernelSet, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, *, seqs: Sequences | None = None,
             state: StateArgs | None = None, d_state_out: torch.Tensor | None = None, want_d_state: bool = False,
             poison: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dx, da, d_state) for upstream gradient dy (the spec's output dtype, unit stride along L).

    d_state_out: the gradient of the new state (float32 [N, H, DH, 2 + 2(k-1)], or None: zero);
    want_d_state: also hand back the old state's gradient (needs ``state``). Args as in :func:`forward`.
    """
    stateful = state is not None or d_state_out is not None
    if not stateful and seqs is None and not want_d_state and poison is None and x.numel():
        return (*plain_backward(backward_plan(ks, a, x, dy), a, x, dy), None)
    batch, heads, head_dim, _ = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    da_buf = gate_grad_buffer(a, x)
    n = batch if seqs is None else seqs.count
    d_state = None
    if want_d_state:
        d_state = x.new_empty((n, heads, head_dim, 2 * ks.spec.recurrence.window_blocks), dtype=torch.float32)
    if poison is not None:
        for t in (dx, da_buf, d_state):
            if t is not None:
                t.fill_(poison)
    if x.numel() == 0 and not want_d_state:
        return dx, torch.zeros_like(a), d_state
    plan = backward_plan(ks, a, x, dy, seqs, state, stateful)
    if not stateful and seqs is None:  # dense, into poisoned buffers or with an (unwritten) d_state
        plan.launch(x.data_ptr(), a.data_ptr(), 0, dy.data_ptr(), dx.data_ptr(), da_buf.data_ptr())
    else:
        fields = {"x": x.data_ptr(), "a": a.data_ptr(), "dy": dy.data_ptr(), "dx": dx.data_ptr(),
                  "da": da_buf.data_ptr()}  # fmt: skip
        launch_stateful(ks, plan, x, fields, seqs, state, dstate_out=d_state_out, dstate=d_state)
    return dx, gate_grad(da_buf, a), d_state


def plain_backward(plan: LaunchPlan, a: torch.Tensor, x: torch.Tensor,
                   dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, da) of a call without a state (L >= 1) by its :func:`backward_plan` (a packed layout's through
    :func:`packed_plan`): fresh buffers, one launch (``launch.backward`` and a ``TrainCall``'s end here)."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    da = gate_grad_buffer(a, x)
    plan.launch(x.data_ptr(), a.data_ptr(), 0, dy.data_ptr(), dx.data_ptr(), da.data_ptr())
    return dx, gate_grad(da, a)


def backward_plan(ks: KernelSet, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, seqs: Sequences | None = None,
                  state: StateArgs | None = None, stateful: bool = False) -> LaunchPlan:  # fmt: skip
    """The backward's launch plan for these inputs (cached on ``ks``); ``stateful``: a state in or out."""
    _, heads, head_dim, length = x.shape
    vec = offsets_fit_vectors(ks.spec.recurrence.block_len, length, seqs, state)
    at_tiles = stateful and starts_at_tiles(ks.spec.recurrence.block_len, state)
    packed = None if seqs is None else bucket_of(tuning_shape(tuple(x.shape), seqs))  # packed: its tuning bucket
    key = ("bwd", packed, stateful, vec, at_tiles, geometry(x, a, dy))

    def build(variant: KernelSet, dev: DeviceKernels) -> LaunchPlan:
        p = _params(variant, a, x, seqs, state)
        p.sdyb, p.sdyh, p.sdyc = _strides3(dy)
        p.sdxb, p.sdxh, p.sdxc = heads * head_dim * length, head_dim * length, length  # dx is contiguous
        use_vec = vec and rows_aligned(x) and rows_aligned(a) and rows_aligned(dy)
        return make_plan(variant, dev, backward_kernel("swr", stateful, at_tiles, use_vec), p)

    return cached_plan(ks, x, key, "bwd", build, tuning_shape(tuple(x.shape), seqs))


def gate_grad_buffer(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Where the backward kernel writes the gates' gradient: a's shape and dtype, contiguous; for per-head
    gates over DH > 16 channels, float32 partials [B, H, DH / 16, L], one per 16-channel group (each warp
    owns one group), which :func:`gate_grad` sums."""
    groups = x.shape[2] // constants.CHANNELS_PER_WARP
    if a.dim() == 4 or groups == 1:  # per channel, or per head over one group: [B, H, 1, L] is a's bytes
        return torch.empty_like(a, memory_format=torch.contiguous_format)
    return x.new_empty((x.shape[0], x.shape[1], groups, x.shape[3]), dtype=torch.float32)


def gate_grad(buf: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The gates' gradient from :func:`gate_grad_buffer`'s buffer (partials summed in a fixed order)."""
    return buf if buf.dim() == a.dim() else buf.sum(dim=2).to(a.dtype)
