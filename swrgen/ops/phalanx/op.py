"""``swrgen.phalanx_gating``: the fused Phalanx gating + SWR as a differentiable torch op.

CUDA tensors run the spec's fused kernels (``fused_gating: true``): packed sequences, a state to
continue from and the new state all run there. CPU tensors run the gating in float64 torch around the
SWR's CPU path (float64 stays float64). Saved for backward: P (and the initial state) only; the
backward kernel recomputes the gates, the forward scan and y. Ways in as in ``swrgen.ops.swr.op``:
direct launches for inference, an autograd.Function for eager training (a repeated dense call's
``_GatingTrainCall`` past the checks), custom ops for torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swrgen import constants
from swrgen.ops.phalanx import launch
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.phalanx.reference import split_projections
from swrgen.ops.swr import op as swr_op
from swrgen.ops.swr.launch import Sequences, StateArgs
from swrgen.ops.swr.state import SwrState, state_width
from swrgen.runtime.kernels import KernelSet
from swrgen.runtime.registry import REGISTRY
from swrgen.spec import Spec


@dataclass(frozen=True)
class Call:
    """A fused call besides P: the kernel set (None on the CPU), layout, window, decay bound, packed
    sequences, the initial state's positions (and phases when known), whether the new state is wanted."""

    ks: KernelSet | None
    layout: GatingLayout
    window_blocks: int
    block_len: int
    decay_max: float
    seqs: Sequences | None = None
    pos: torch.Tensor | None = None
    phases: tuple[int, ...] | None = None
    want_state: bool = False

    def swr_call(self, want_state: bool) -> swr_op.Call:
        """The SWR part of the CPU computation."""
        return swr_op.Call(None, self.window_blocks, self.block_len, torch.float64, self.seqs, self.pos, self.phases,
                           want_state)  # fmt: skip

    def state_args(self, data: torch.Tensor | None) -> StateArgs | None:
        return None if data is None else StateArgs(data=data, pos=self.pos, phases=self.phases)


def _gated(P: torch.Tensor, call: Call):
    """float64 (s_A [B, L, H], s_B, C, V [B, L, H, DH], a [B, H, L], u [B, H, DH, L]) of the CPU path."""
    sa_l, pb, pc, pv = split_projections(P.to(torch.float64), call.layout)
    sa, sb = torch.sigmoid(sa_l), torch.sigmoid(pb)
    a = (call.decay_max * sa).transpose(1, 2)
    u = (sb * pv).permute(0, 2, 3, 1)
    return sa, sb, pc, pv, a, u


def forward_call(call: Call, P: torch.Tensor, data: torch.Tensor | None):
    """(Z, new state data or None, new positions or None)."""
    if P.is_cuda:
        return launch.forward(call.ks, P, call.layout, call.decay_max, seqs=call.seqs, state=call.state_args(data),
                              want_state=call.want_state)  # fmt: skip
    _, _, pc, pv, a, u = _gated(P, call)
    y, data_out, pos_out = swr_op.forward_call(call.swr_call(call.want_state), a, u, data)
    Z = y.permute(0, 3, 1, 2) * pc + pv
    return Z.reshape(*P.shape[:-1], call.layout.inner).to(P.dtype).contiguous(), data_out, pos_out


def backward_call(call: Call, P: torch.Tensor, dZ: torch.Tensor, data: torch.Tensor | None,
              d_data_out: torch.Tensor | None, want_d_state: bool):  # fmt: skip
    """(dP, d_state or None)."""
    if P.is_cuda:
        return launch.backward(call.ks, P, dZ, call.layout, call.decay_max, seqs=call.seqs,
                               state=call.state_args(data), d_state_out=d_data_out,
                               want_d_state=want_d_state and data is not None)  # fmt: skip
    layout, dm = call.layout, call.decay_max
    batch, length = P.shape[:2]
    sa, sb, pc, pv, a, u = _gated(P, call)
    y, _, _ = swr_op.forward_call(call.swr_call(False), a, u, data)
    dz = dZ.to(torch.float64).reshape(batch, length, layout.heads, layout.head_dim)
    dy = (dz * pc).permute(0, 2, 3, 1)
    da, du, d_state = swr_op.backward_call(call.swr_call(False), a, u, data, dy, d_data_out, want_d_state)
    du = du.permute(0, 3, 1, 2)  # [B, L, H, DH]
    dpa = da.transpose(1, 2) * dm * sa * (1 - sa)
    dpb = du * pv * sb * (1 - sb)
    dpc = dz * y.permute(0, 3, 1, 2)
    dpv = dz + du * sb

    def reduce_groups(t: torch.Tensor) -> torch.Tensor:  # per head -> per kv-head
        return t.reshape(batch, length, layout.kv_heads, layout.kv_group, layout.head_dim).sum(3).flatten(2)

    dP = torch.cat([dpa, reduce_groups(dpb), reduce_groups(dpc), dpv.flatten(2)], dim=-1)
    return dP.to(P.dtype), d_state


# ---------------------------------------------------------------- eager autograd


class _PhalanxTrainCallFunction(torch.autograd.Function):
    """Eager training of a call without a state that passed the checks before (:class:`_GatingTrainCall`)."""

    @staticmethod
    def forward(ctx, P, call: _GatingTrainCall):
        ctx.save_for_backward(P)
        ctx.call = call
        return call.forward.run(P)

    @staticmethod
    def backward(ctx, dZ):
        (P,) = ctx.saved_tensors
        return ctx.call.backward(P, dZ), None


class _PhalanxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, data, call: Call):
        Z, data_out, pos_out = forward_call(call, P, data)
        ctx.save_for_backward(P, data)
        ctx.call = call
        ctx.set_materialize_grads(False)
        if pos_out is not None:
            ctx.mark_non_differentiable(pos_out)
        return Z, data_out, pos_out

    @staticmethod
    def backward(ctx, dZ, d_data_out, _d_pos):
        P, data = ctx.saved_tensors
        dZ = swr_op.grad_output(dZ, (*P.shape[:-1], ctx.call.layout.inner), P.dtype, P.device)
        d_data_out = swr_op.grad_state(d_data_out) if P.is_cuda else d_data_out
        dP, d_state = backward_call(ctx.call, P, dZ, data, d_data_out, ctx.needs_input_grad[1])
        return dP, d_state, None


# ---------------------------------------------------------------- custom ops (torch.compile, torch modes)

_EMPTY = (0,)


def _op_call(key, P, heads, kv_heads, head_dim, k, bl, decay_max, pos, cu_seqlens, want_state) -> Call:
    seqs = None if cu_seqlens is None else Sequences(cu_seqlens.tolist())
    return Call(REGISTRY.get(key) if P.is_cuda else None, GatingLayout(heads, kv_heads, head_dim), k, bl, decay_max,
                seqs, pos, None, want_state)  # fmt: skip


@torch.library.custom_op("swrgen::phalanx_fwd", mutates_args=())
def _phalanx_fwd(P: torch.Tensor, state: torch.Tensor | None, pos: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 heads: int, kv_heads: int, head_dim: int, window_blocks: int, block_len: int, decay_max: float,
                 key: str, want_state: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    call = _op_call(key, P, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, pos, cu_seqlens, want_state)
    Z, data_out, pos_out = forward_call(call, P, state)
    if data_out is None:
        return Z, P.new_empty(_EMPTY, dtype=torch.float32), P.new_empty(_EMPTY, dtype=torch.int64)
    return Z, data_out, pos_out


@_phalanx_fwd.register_fake
def _(P, state, pos, cu_seqlens, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, key, want_state):
    Z = P.new_empty((P.shape[0], P.shape[1], heads * head_dim))
    if not want_state:
        return Z, P.new_empty(_EMPTY, dtype=torch.float32), P.new_empty(_EMPTY, dtype=torch.int64)
    n = P.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if P.is_cuda:
        dtype = torch.float32
    else:
        dtype = state.dtype if state is not None else (torch.float64 if P.dtype == torch.float64 else torch.float32)
    data = P.new_empty((n, heads, head_dim, state_width(window_blocks)), dtype=dtype)
    return Z, data, P.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("swrgen::phalanx_bwd", mutates_args=())
def _phalanx_bwd(P: torch.Tensor, dZ: torch.Tensor, state: torch.Tensor | None, pos: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, d_state_out: torch.Tensor | None, heads: int, kv_heads: int,
                 head_dim: int, window_blocks: int, block_len: int, decay_max: float, key: str,
                 want_d_state: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    call = _op_call(key, P, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, pos, cu_seqlens, False)
    dP, d_state = backward_call(call, P, dZ, state, d_state_out, want_d_state)
    return dP, (d_state if d_state is not None else P.new_empty(_EMPTY, dtype=torch.float32))


@_phalanx_bwd.register_fake
def _(P, dZ, state, pos, cu_seqlens, d_state_out, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, key,
      want_d_state):  # fmt: skip
    want = want_d_state and state is not None
    d_state = torch.empty_like(state) if want else P.new_empty(_EMPTY, dtype=torch.float32)
    return torch.empty_like(P, memory_format=torch.contiguous_format), d_state


def _setup_context(ctx, inputs, output) -> None:
    P, state, pos, cu_seqlens, *ctx.args = inputs
    ctx.save_for_backward(P, state, pos, cu_seqlens)
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dZ, d_data_out, _d_pos):
    P, state, pos, cu_seqlens = ctx.saved_tensors
    heads, kv_heads, head_dim, k, bl, dm, key, want_state = ctx.args
    dZ = swr_op.grad_output(dZ, (*P.shape[:-1], heads * head_dim), P.dtype, P.device)
    if not want_state or (d_data_out is not None and d_data_out.numel() == 0):
        d_data_out = None
    elif P.is_cuda:
        d_data_out = swr_op.grad_state(d_data_out)
    want = state is not None and ctx.needs_input_grad[1]
    dP, d_state = _phalanx_bwd(P, dZ, state, pos, cu_seqlens, d_data_out, heads, kv_heads, head_dim, k, bl, dm, key,
                               want)  # fmt: skip
    return (dP, d_state if want else None) + (None,) * 10


torch.library.register_autograd("swrgen::phalanx_fwd", _op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- checks and the public op


def check_projections(P: object, layout: GatingLayout, decay_max: object) -> None:
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P must be a tensor; got {type(P).__name__}")
    if P.dim() != 3 or P.shape[-1] != layout.width:
        raise ValueError(
            f"P must be the projections [B, L, N] with N = H + 2*KVH*DH + H*DH = {layout.width} "
            f"(heads={layout.heads}, kv_heads={layout.kv_heads}, head_dim={layout.head_dim}); got {list(P.shape)}"
        )
    if not P.is_floating_point():
        raise TypeError(f"P must be a floating-point tensor; got {P.dtype}")
    if P.stride(-1) != 1:
        raise ValueError(f"P must have unit stride along its last dim; got strides {P.stride()}. Call .contiguous().")
    if isinstance(decay_max, bool) or not isinstance(decay_max, (int, float)) or not 0 < decay_max <= 1:
        raise ValueError(f"decay_max must be a number in (0, 1]; got {decay_max!r}")


def _spec_kernels(spec: Spec | str | Path, P: torch.Tensor, layout: GatingLayout, k: int, bl: int) -> KernelSet:
    op = swr_op.load(spec)
    r = op.spec.recurrence
    if not r.fused_gating:
        raise ValueError(f"spec {op.spec.name!r} has no fused Phalanx kernels (recurrence.fused_gating is false)")
    for name, given, have in (("window_blocks", k, r.window_blocks), ("block_len", bl, r.block_len),
                              ("head_dim", layout.head_dim, r.head_dim)):  # fmt: skip
        if given != have:
            raise ValueError(f"{name}={given} disagrees with spec {op.spec.name!r} ({name}={have})")
    if P.is_cuda and P.dtype != constants.torch_dtype(r.input_dtype):
        raise TypeError(f"P has dtype {P.dtype} but spec {op.spec.name!r} takes {constants.torch_dtype(r.input_dtype)}")
    return op.kernels


class _GatingCall:
    """A validated inference call of the fused forward and, packed, its layout (whose device offsets the plan
    points at); ``REGISTRY.calls`` keeps these."""

    __slots__ = ("plan", "seqs", "shape")

    def __init__(self, plan, shape: tuple[int, int, int], seqs: Sequences | None = None) -> None:
        self.plan, self.shape, self.seqs = plan, shape, seqs

    def run(self, P: torch.Tensor) -> torch.Tensor:
        Z = P.new_empty(self.shape)  # P's dtype and device; a tuple shape parses faster than a torch.Size
        self.plan.launch(P.data_ptr(), 0, Z.data_ptr())
        return Z

    __call__ = run


class _GatingTrainCall:
    """A validated training call of the fused op without a state (dense, or packed with its layout fixed): the
    forward's :class:`_GatingCall` and the backward's plan, made by the first backward whose dZ is laid out
    as autograd hands it (P's dtype, contiguous, 16-byte aligned); another layout takes the general backward
    (``REGISTRY.calls`` keeps these)."""

    __slots__ = ("_bwd", "decay_max", "forward", "ks", "layout")

    def __init__(self, ks: KernelSet, forward: _GatingCall, layout: GatingLayout, decay_max: float) -> None:
        self.ks, self.forward, self.layout, self.decay_max = ks, forward, layout, decay_max
        self._bwd = None

    def __call__(self, P: torch.Tensor) -> torch.Tensor:
        return _PhalanxTrainCallFunction.apply(P, self)

    def backward(self, P: torch.Tensor, dZ: torch.Tensor) -> torch.Tensor:
        """dP for upstream gradient dZ."""
        seqs = self.forward.seqs
        if dZ.dtype != P.dtype or not dZ.is_contiguous() or dZ.data_ptr() % constants.VECTOR_BYTES:
            dZ = swr_op.grad_output(dZ, self.forward.shape, P.dtype, P.device)
            return launch.backward(self.ks, P, dZ, self.layout, self.decay_max, seqs=seqs)[0]
        plan = self._bwd
        if plan is None:  # a contiguous aligned dZ of Z's shape: every such dZ gets this plan
            plan = launch.backward_plan(self.ks, P, dZ, self.layout, self.decay_max, seqs)
            plan = self._bwd = launch.packed_plan(self.ks, plan, P, seqs)
        return launch.plain_backward(plan, P, dZ, self.layout)


def phalanx_gating(P: torch.Tensor, *, heads: int, kv_heads: int | None = None, head_dim: int = 16,
                   window_blocks: int = 2, block_len: int = 16, decay_max: float = 0.8,
                   spec: Spec | str | Path | None = None, cu_seqlens=None, initial_state: SwrState | None = None,
                   return_state: bool = False, cp_group=None):  # fmt: skip
    """Z [B, L, H*DH] from the Phalanx projections P [B, L, H + 2*KVH*DH + H*DH] (columns A | B | C | V):

        a = decay_max * sigmoid(P_A),  y = SWR(a, sigmoid(P_B) * P_V),  Z = y * P_C + P_V

    B and C are shared by the heads of a kv-group (head h reads kv-head h // (H // KVH)). On CUDA one
    generated kernel does all of it (and one the backward); ``spec`` picks a fused spec, else the default
    one for P's dtype. Z has P's dtype.

    cu_seqlens: int [S+1] offsets of sequences packed in a [1, T, N] P (tiles aligned to each sequence's
    start, nothing crosses one). initial_state / return_state: continue each sequence (batch entry or packed
    sequence) from its SWR state and return ``(Z, new_state)``, differentiable like ``swrgen.swr``'s.
    cp_group: context parallelism across a process group, as in ``swrgen.swr``.
    """
    if cp_group is not None:  # validated (on every rank at once) and run by swrgen.distributed
        from swrgen.distributed import context_parallel

        return context_parallel.phalanx_gating(P, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                               window_blocks=window_blocks, block_len=block_len,
                                               decay_max=decay_max, spec=spec, cu_seqlens=cu_seqlens,
                                               initial_state=initial_state, return_state=return_state,
                                               cp_group=cp_group)  # fmt: skip
    key = mode = None
    if spec is None and initial_state is None and return_state is False:
        mode = swr_op.fast_path(P)
    if mode is not None:
        # The scalar arguments' types too: heads=True or heads=2.0 must not be served the plan of heads=1 or 2.
        args = (heads, kv_heads, head_dim, window_blocks, block_len, decay_max, type(heads), type(kv_heads),
                type(head_dim), type(window_blocks), type(block_len), type(decay_max))  # fmt: skip
        key = ("phalanx", mode, P.shape, P.stride(), P.dtype, P.get_device(), launch.aligned(P), args)
        if cu_seqlens is not None:  # packed: offsets given as host ints only
            packed = swr_op.packed_key(cu_seqlens, P.shape[1], P.device)
            key = None if packed is None else (*key, *packed)
    if key is not None:
        hit = REGISTRY.calls.get(key)
        if hit is not None:  # P and arguments like these passed the checks below
            return hit(P)
    layout = GatingLayout(heads, heads if kv_heads is None else kv_heads, head_dim)
    check_projections(P, layout, decay_max)
    k, bl = swr_op.check_window(window_blocks, block_len)
    dm = float(decay_max)
    if spec is not None:
        ks = _spec_kernels(spec, P, layout, k, bl)
    elif P.is_cuda:
        if P.dtype == torch.float64:
            raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32")
        args = (head_dim, False, P.dtype, P.dtype, k, bl, P.dtype, True)
        ks = swr_op.default_key(*args) if torch.compiler.is_compiling() else swr_op.default_kernels(*args)
    else:
        ks = None
    seqs = None if cu_seqlens is None else swr_op.packed_sequences(cu_seqlens, tuple(P.shape), P.shape[1], P.device)
    if key is not None and P.shape[1] > 0:  # the checks passed: remember the plans
        plan = launch.packed_plan(ks, launch.forward_plan(ks, P, layout, dm, seqs), P, seqs)
        call = _GatingCall(plan, (P.shape[0], P.shape[1], layout.inner), seqs)
        if mode == "train":
            call = _GatingTrainCall(ks, call, layout, dm)
        if ks.caching:
            REGISTRY.calls.put(key, call)
        return call(P)
    if seqs is None and P.shape[1] < 1:
        raise ValueError("P must hold at least one token (L >= 1)")
    state = None
    if initial_state is not None:
        n = P.shape[0] if seqs is None else seqs.count
        if not isinstance(initial_state, SwrState):
            raise TypeError(f"initial_state must be a swrgen SwrState; got {type(initial_state).__name__}")
        initial_state.check(n, layout.heads, layout.head_dim, k, bl)
        if initial_state.device != P.device:
            raise ValueError(f"initial_state is on {initial_state.device} but P is on {P.device}")
        state = initial_state
    return run(ks, P, layout, k, bl, dm, seqs, state, return_state)


def run(ks: KernelSet | str | None, P: torch.Tensor, layout: GatingLayout, k: int, bl: int, dm: float,
        seqs: Sequences | None, state: SwrState | None, return_state: bool):  # fmt: skip
    """A checked call (see :func:`swrgen.ops.swr.op.run`)."""
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be True or False; got {return_state!r}")
    data = None if state is None else (state.packed() if P.is_cuda else state.data)
    phases = None if state is None or state.host_pos is None else tuple(p % bl for p in state.host_pos)
    call = Call(None if isinstance(ks, str) else ks, layout, k, bl, dm, seqs, None if state is None else state.pos,
                phases, return_state)  # fmt: skip
    if swr_op.eager_ok():
        needs_grad = torch.is_grad_enabled() and (P.requires_grad or (data is not None and data.requires_grad))
        if needs_grad:
            Z, data_out, pos_out = _PhalanxFunction.apply(P, data, call)
        else:
            Z, data_out, pos_out = forward_call(call, P, data)
    else:
        cu = None if seqs is None else torch.tensor(seqs.starts, dtype=torch.int64)
        key = ks if isinstance(ks, str) else ("" if ks is None else ks.key)
        Z, data_out, pos_out = _phalanx_fwd(P, data, call.pos, cu, layout.heads, layout.kv_heads, layout.head_dim, k,
                                            bl, dm, key, return_state)  # fmt: skip
    if not return_state:
        return Z
    host = None
    if state is None or state.host_pos is not None:
        n = P.shape[0] if seqs is None else seqs.count
        start = (0,) * n if state is None else state.host_pos
        lengths = [P.shape[1]] * n if seqs is None else seqs.lengths
        host = tuple(p + m for p, m in zip(start, lengths, strict=True))
    return Z, SwrState(data_out, pos_out, bl, host)


# ---------------------------------------------------------------- decoding against a pool of state slots


@torch.no_grad()
def phalanx_decode(P: torch.Tensor, state_data: torch.Tensor, pos: torch.Tensor, state_indices: torch.Tensor | None,
                   *, heads: int, kv_heads: int | None = None, head_dim: int = 16, window_blocks: int = 2,
                   block_len: int = 16, decay_max: float = 0.8) -> torch.Tensor:  # fmt: skip
    """One token per sequence: Z [B, H*DH] from its projections P [B, N], its SWR state updated in place.

    state_data: float32 [S, H, DH, 2 + 2(k-1)], a pool of S slots (a SwrState's ``data``); sequence b uses
    slot ``state_indices[b]`` (int64 [B] on the device; None: slot b). pos: int64 [S], every slot's tokens
    so far; read, not advanced (the layers of a model share it; advance it once per step). On CUDA one
    generated kernel does the gates, the state update and Z, at fixed addresses: a captured CUDA graph
    replays at every position. Inference only (no gradient).
    """
    layout = GatingLayout(heads, heads if kv_heads is None else kv_heads, head_dim)
    k, bl = swr_op.check_window(window_blocks, block_len)
    if not isinstance(P, torch.Tensor) or P.dim() != 2 or P.shape[-1] != layout.width:
        raise ValueError(f"P must be [B, N = {layout.width}] (one token per sequence); got "
                         f"{list(getattr(P, 'shape', []))}")  # fmt: skip
    check_projections(P.unsqueeze(1), layout, decay_max)
    width = state_width(k)
    if (not isinstance(state_data, torch.Tensor) or state_data.dim() != 4 or state_data.dtype != torch.float32
            or tuple(state_data.shape[1:]) != (layout.heads, layout.head_dim, width)
            or not state_data.is_contiguous()):  # fmt: skip
        got = f"{getattr(state_data, 'dtype', None)} {list(getattr(state_data, 'shape', []))}"
        raise ValueError(f"state_data must be contiguous float32 [S, H={layout.heads}, DH={layout.head_dim}, "
                         f"{width}]; got {got}")  # fmt: skip
    slots = state_data.shape[0]
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or tuple(pos.shape) != (slots,):
        raise ValueError(f"pos must be int64 [S = {slots}]; got {getattr(pos, 'dtype', None)} "
                         f"{list(getattr(pos, 'shape', []))}")  # fmt: skip
    batch = P.shape[0]
    if state_indices is None:
        if batch > slots:
            raise ValueError(f"{batch} sequences but {slots} slots; pass state_indices to map them")
    elif (not isinstance(state_indices, torch.Tensor) or state_indices.dtype != torch.int64
          or tuple(state_indices.shape) != (batch,)):  # fmt: skip
        raise ValueError(f"state_indices must be int64 [B = {batch}]; got {getattr(state_indices, 'dtype', None)} "
                         f"{list(getattr(state_indices, 'shape', []))}")  # fmt: skip
    for name, t in (("state_data", state_data), ("pos", pos), ("state_indices", state_indices)):
        if t is not None and t.device != P.device:
            raise ValueError(f"{name} is on {t.device} but P is on {P.device}")
    dm = float(decay_max)
    if P.is_cuda:
        if P.dtype == torch.float64:
            raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32")
        ks = swr_op.default_kernels(head_dim, False, P.dtype, P.dtype, k, bl, P.dtype, True)
        return launch.decode(ks, P, layout, dm, state_data, pos, state_indices)
    from swrgen.ops.swr.state import decode_step

    rows = torch.arange(batch) if state_indices is None else state_indices
    st = SwrState(state_data.index_select(0, rows), pos.index_select(0, rows), bl)
    sa, sb, pc, pv = split_projections(P.to(torch.float64).unsqueeze(1), layout)
    y, new = decode_step(dm * torch.sigmoid(sa[:, 0]), (torch.sigmoid(sb) * pv)[:, 0], st.to(dtype=torch.float64), k,
                         bl)  # fmt: skip
    state_data.index_copy_(0, rows, new.data.to(state_data.dtype))
    Z = y * pc[:, 0] + pv[:, 0]
    return Z.reshape(batch, layout.inner).to(P.dtype)
