"""``swrgen.swr``: the SWR as a differentiable torch op, with packed sequences and a streaming state.

CUDA tensors run the generated kernels; CPU tensors run the kernels' algorithm in float64 torch (the
tile scans and carriers of ``tiled.py``: same semantics, any floating dtype, the same arithmetic as the
streaming and decode paths). Gradients reach ``a``, ``x`` and the initial state, and flow back from the
returned state, so chunked training with a state handed over trains exactly like one pass.

Three ways in, one computation (``forward_call`` / ``backward_call``, no autograd):

- inference calls (no gradient to record, not tracing, no torch mode) launch directly; one that repeats
  a geometry and arguments hits ``REGISTRY.calls`` and skips every check (small calls are launch-bound);
- eager training goes through a ``torch.autograd.Function`` (a few microseconds cheaper per call than
  the dispatcher); a dense call that repeats a geometry and arguments hits its ``TrainCall`` there, whose
  forward and backward launch cached plans past every check;
- ``torch.compile``, and any torch function or dispatch mode, see the ``swrgen::swr_fwd`` /
  ``swrgen::swr_bwd`` custom ops (fake implementations for tracing, the same autograd formula).

Saved for backward: the inputs and the initial state only (the backward kernel recomputes the rest).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from swrgen import constants
from swrgen.ops.swr import launch
from swrgen.ops.swr.state import SwrState, state_width
from swrgen.ops.swr.tiled import (
    swr_tiled_backward,
    swr_tiled_backward_state,
    swr_tiled_forward,
    swr_tiled_forward_state,
)
from swrgen.ops.swr.varlen import check_cu_seqlens
from swrgen.runtime.kernels import KernelSet
from swrgen.runtime.program import Program
from swrgen.runtime.registry import REGISTRY
from swrgen.spec import Spec, load_spec

DEFAULT_WINDOW_BLOCKS = 2
DEFAULT_BLOCK_LEN = 16


# ---------------------------------------------------------------- when to bypass autograd / the dispatcher


def fast_path(*tensors: torch.Tensor) -> str | None:
    """Which validated call a dense eager call of plain CUDA tensors may reuse from ``REGISTRY.calls``:
    ``"infer"`` (no gradient to record: a direct launch), ``"train"`` (the dense autograd.Function of a
    ``TrainCall``), or None (tracing, checked first: dynamo folds it to a constant; a tensor subclass, a CPU
    tensor, a torch function or dispatch mode that expects to see the op: the checked path)."""
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_cuda:
            return None
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return None
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return "train"
    return "infer"


def eager_ok() -> bool:
    """True when an autograd.Function may stand in for the custom ops (not tracing, no torch mode)."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
    )


# ---------------------------------------------------------------- one call's computation


@dataclass(frozen=True)
class Call:
    """What a call computes besides its tensors: the kernel set (None on the CPU), the window, the output
    dtype, packed sequences, the initial state's positions (and phases, when the host knows them)."""

    ks: KernelSet | None
    window_blocks: int
    block_len: int
    out_dtype: torch.dtype
    seqs: launch.Sequences | None = None
    pos: torch.Tensor | None = None
    phases: tuple[int, ...] | None = None
    want_state: bool = False

    def state_args(self, data: torch.Tensor | None) -> launch.StateArgs | None:
        if data is None:
            return None
        return launch.StateArgs(data=data, pos=self.pos, phases=self.phases)

    def host_positions(self, n: int) -> list[int]:
        """The initial positions on the host (CPU paths; zeros without a state)."""
        return [0] * n if self.pos is None else self.pos.tolist()


def _spans(call: Call, length: int) -> list[tuple[int, int]]:
    return [(0, length)] if call.seqs is None else list(itertools.pairwise(call.seqs.starts))


def forward_call(call: Call, a: torch.Tensor, x: torch.Tensor, data: torch.Tensor | None):
    """(y, new state data or None, new positions or None)."""
    if x.is_cuda:
        return launch.forward(call.ks, a, x, seqs=call.seqs, state=call.state_args(data), want_state=call.want_state)
    k, bl = call.window_blocks, call.block_len
    if data is None and not call.want_state:
        if call.seqs is None:
            return swr_tiled_forward(a, x, k, bl).to(call.out_dtype).contiguous(), None, None
        ys = [swr_tiled_forward(a[..., s:e], x[..., s:e], k, bl) for s, e in _spans(call, x.shape[-1]) if e > s]
        return torch.cat(ys or [x.new_empty(x.shape)], dim=-1).to(call.out_dtype).contiguous(), None, None
    ys, outs = [], []
    n = x.shape[0] if call.seqs is None else call.seqs.count
    pos = call.host_positions(n)
    for i, (s, e) in enumerate(_spans(call, x.shape[-1])):
        if call.seqs is None:  # the whole dense batch at once
            y, out = swr_tiled_forward_state(a, x, k, bl, data, pos)
        else:
            y, out = swr_tiled_forward_state(a[..., s:e], x[..., s:e], k, bl, None if data is None else data[i : i + 1],
                                             [pos[i]])  # fmt: skip
        ys.append(y)
        outs.append(out)
    y = torch.cat(ys, dim=-1).to(call.out_dtype).contiguous()
    if not call.want_state:
        return y, None, None
    lengths = torch.tensor([x.shape[-1]] * n if call.seqs is None else call.seqs.lengths, dtype=torch.int64)
    base = call.pos if call.pos is not None else torch.zeros(n, dtype=torch.int64)
    # A new state keeps the old one's dtype; a fresh one of float64 inputs is float64 (exact), else float32.
    dtype = data.dtype if data is not None else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y, torch.cat(outs).to(dtype), base + lengths


def backward_call(call: Call, a: torch.Tensor, x: torch.Tensor, data: torch.Tensor | None, dy: torch.Tensor,
              d_data_out: torch.Tensor | None, want_d_state: bool):  # fmt: skip
    """(da, dx, d_state or None)."""
    if x.is_cuda:
        dx, da, d_state = launch.backward(call.ks, a, x, dy, seqs=call.seqs, state=call.state_args(data),
                                          d_state_out=d_data_out,
                                          want_d_state=want_d_state and data is not None)  # fmt: skip
        return da, dx, d_state
    k, bl = call.window_blocks, call.block_len
    stateful = data is not None or d_data_out is not None
    dxs, das, dds = [], [], []
    n = x.shape[0] if call.seqs is None else call.seqs.count
    pos = call.host_positions(n)
    for i, (s, e) in enumerate(_spans(call, x.shape[-1])):
        if call.seqs is None:
            sl, rows = slice(None), slice(None)
        else:
            sl, rows = slice(s, e), slice(i, i + 1)
        a_, x_, dy_ = a[..., sl], x[..., sl], dy[..., sl]
        if not stateful:
            if x_.shape[-1] == 0:  # an empty packed sequence
                continue
            dx_, da_ = swr_tiled_backward(a_, x_, dy_, k, bl)
        else:
            d = None if data is None else data[rows]
            do = None if d_data_out is None else d_data_out[rows]
            dx_, da_, dd = swr_tiled_backward_state(a_, x_, dy_, k, bl, d, pos if call.seqs is None else [pos[i]], do)
            dds.append(dd)
        dxs.append(dx_)
        das.append(da_)
    dx = torch.cat(dxs or [torch.zeros_like(x)], dim=-1).to(x.dtype).contiguous()
    da = torch.cat(das or [torch.zeros_like(a)], dim=-1).to(a.dtype).contiguous()
    d_state = torch.cat(dds).to(data.dtype) if (want_d_state and data is not None) else None
    return da, dx, d_state


def grad_output(dy: torch.Tensor | None, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:  # fmt: skip
    """The upstream gradient as the kernels take it (both ops' backwards): the output dtype, unit stride along
    the last dimension; zeros of ``shape`` where autograd passed none."""
    if dy is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    dy = dy.to(dtype)
    return dy if dy.stride(-1) == 1 else dy.contiguous()


def grad_state(d: torch.Tensor | None) -> torch.Tensor | None:
    """The new state's upstream gradient as the kernels take it: float32, contiguous (or None)."""
    return None if d is None else d.to(torch.float32).contiguous()


# ---------------------------------------------------------------- eager autograd


class _SwrTrainCallFunction(torch.autograd.Function):
    """Eager training of a call without a state that passed the checks before (:class:`TrainCall`, dense or
    packed): one output, a backward that launches the cached plan (a training call's host time is mostly
    the checked path's)."""

    @staticmethod
    def forward(ctx, a, x, call: TrainCall):
        ctx.save_for_backward(a, x)
        ctx.call = call
        return call.forward.run(a, x)

    @staticmethod
    def backward(ctx, dy):
        a, x = ctx.saved_tensors
        da, dx = ctx.call.backward(a, x, dy)
        return da, dx, None


class _SwrFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, data, call: Call):
        y, data_out, pos_out = forward_call(call, a, x, data)
        ctx.save_for_backward(a, x, data)
        ctx.call = call
        ctx.set_materialize_grads(False)
        if pos_out is not None:
            ctx.mark_non_differentiable(pos_out)
        return y, data_out, pos_out

    @staticmethod
    def backward(ctx, dy, d_data_out, _d_pos):
        a, x, data = ctx.saved_tensors
        call: Call = ctx.call
        dy = grad_output(dy, x.shape, call.out_dtype, x.device)
        d_data_out = grad_state(d_data_out) if x.is_cuda else d_data_out
        da, dx, d_state = backward_call(call, a, x, data, dy, d_data_out, ctx.needs_input_grad[2])
        return da, dx, d_state, None


# ---------------------------------------------------------------- custom ops (torch.compile, torch modes)

_EMPTY = (0,)


def _op_call(key: str, k: int, bl: int, out_dtype: torch.dtype, x: torch.Tensor, pos, cu_seqlens,
             want_state: bool) -> Call:  # fmt: skip
    seqs = None if cu_seqlens is None else launch.Sequences(cu_seqlens.tolist())
    return Call(REGISTRY.get(key) if x.is_cuda else None, k, bl, out_dtype, seqs, pos, None, want_state)


@torch.library.custom_op("swrgen::swr_fwd", mutates_args=())
def _swr_fwd(a: torch.Tensor, x: torch.Tensor, state: torch.Tensor | None, pos: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None, window_blocks: int, block_len: int, key: str, out_dtype: torch.dtype,
             want_state: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """cu_seqlens: int64 CPU [S+1]; state / pos: the initial state's data and positions. Returns (y, new state
    data, new positions), the last two empty without ``want_state``."""
    call = _op_call(key, window_blocks, block_len, out_dtype, x, pos, cu_seqlens, want_state)
    y, data_out, pos_out = forward_call(call, a, x, state)
    if data_out is None:
        return y, x.new_empty(_EMPTY, dtype=torch.float32), x.new_empty(_EMPTY, dtype=torch.int64)
    return y, data_out, pos_out


@_swr_fwd.register_fake
def _(a, x, state, pos, cu_seqlens, window_blocks, block_len, key, out_dtype, want_state):
    y = x.new_empty(x.shape, dtype=out_dtype)
    if not want_state:
        return y, x.new_empty(_EMPTY, dtype=torch.float32), x.new_empty(_EMPTY, dtype=torch.int64)
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if x.is_cuda:
        dtype = torch.float32
    else:
        dtype = state.dtype if state is not None else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    data = x.new_empty((n, x.shape[1], x.shape[2], state_width(window_blocks)), dtype=dtype)
    return y, data, x.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("swrgen::swr_bwd", mutates_args=())
def _swr_bwd(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, state: torch.Tensor | None, pos: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None, d_state_out: torch.Tensor | None, window_blocks: int, block_len: int,
             key: str, want_d_state: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    call = _op_call(key, window_blocks, block_len, dy.dtype, x, pos, cu_seqlens, False)
    da, dx, d_state = backward_call(call, a, x, state, dy, d_state_out, want_d_state)
    return da, dx, (d_state if d_state is not None else x.new_empty(_EMPTY, dtype=torch.float32))


@_swr_bwd.register_fake
def _(a, x, dy, state, pos, cu_seqlens, d_state_out, window_blocks, block_len, key, want_d_state):
    want = want_d_state and state is not None
    d_state = torch.empty_like(state) if want else x.new_empty(_EMPTY, dtype=torch.float32)
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format), d_state)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    a, x, state, pos, cu_seqlens, k, bl, key, out_dtype, want_state = inputs
    ctx.save_for_backward(a, x, state, pos, cu_seqlens)
    ctx.k, ctx.bl, ctx.key, ctx.out_dtype, ctx.want_state = k, bl, key, out_dtype, want_state
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dy, d_data_out, _d_pos):
    a, x, state, pos, cu_seqlens = ctx.saved_tensors
    dy = grad_output(dy, x.shape, ctx.out_dtype, x.device)
    if not ctx.want_state or (d_data_out is not None and d_data_out.numel() == 0):
        d_data_out = None
    elif x.is_cuda:
        d_data_out = grad_state(d_data_out)
    want = state is not None and ctx.needs_input_grad[2]
    da, dx, d_state = _swr_bwd(a, x, dy, state, pos, cu_seqlens, d_data_out, ctx.k, ctx.bl, ctx.key, want)
    return da, dx, (d_state if want else None), None, None, None, None, None, None, None


torch.library.register_autograd("swrgen::swr_fwd", _op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- input checks


def check_tensors(a: object, x: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(a, torch.Tensor):
        raise TypeError(f"swr(a, x) takes tensors; got a={type(a).__name__}, x={type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, DH, L] (4 dims); got shape {list(x.shape)}")
    batch, heads, head_dim, length = x.shape
    per_head, per_channel = (batch, heads, length), (batch, heads, head_dim, length)
    if tuple(a.shape) not in (per_head, per_channel):
        raise ValueError(
            f"a must be [B, H, L] = {list(per_head)} (per-head gates) or [B, H, DH, L] = {list(per_channel)} "
            f"(per-channel gates) for x of shape {list(x.shape)}; got {list(a.shape)}"
        )
    if a.device != x.device:
        raise ValueError(f"a and x must be on one device; got a on {a.device}, x on {x.device}")
    for name, t in (("x", x), ("a", a)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along L (the last dim); got strides {t.stride()}. "
                             "Call .contiguous() first.")  # fmt: skip


def check_window(window_blocks: object, block_len: object) -> tuple[int, int]:
    """The window arguments as ints >= 1 (a bool or float is a mistake, not a number of tiles)."""
    for name, v in (("window_blocks", window_blocks), ("block_len", block_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r} ({type(v).__name__})")
    return window_blocks, block_len  # type: ignore[return-value]


def check_against_spec(spec: Spec, a: torch.Tensor, x: torch.Tensor) -> None:
    """The tensors fit the spec's recurrence (head_dim and gate layout always; dtypes on CUDA)."""
    r = spec.recurrence
    if x.shape[2] != r.head_dim:
        raise ValueError(f"x has head_dim {x.shape[2]} (dim 2) but spec {spec.name!r} has head_dim {r.head_dim}")
    layout = "per_channel" if a.dim() == 4 else "per_head"
    if layout != r.gate_layout:
        raise ValueError(f"a has {layout} gates (shape {list(a.shape)}) but spec {spec.name!r} has {r.gate_layout}")
    if not x.is_cuda:
        return
    for name, t, dtype, field in (("x", x, r.input_dtype, "input"), ("a", a, r.gate_dtype, "gate")):
        if t.dtype != constants.torch_dtype(dtype):
            raise TypeError(f"{name} has dtype {t.dtype} but spec {spec.name!r} takes {constants.torch_dtype(dtype)} "
                            f"(recurrence.dtypes.{field})")  # fmt: skip


def check_out_dtype(out_dtype: object, x: torch.Tensor) -> None:
    if out_dtype is None:
        return
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch dtype; got {out_dtype!r}")
    if x.is_cuda and out_dtype not in (torch.float32, x.dtype):
        raise ValueError(f"out_dtype={out_dtype}: the CUDA kernels write torch.float32 or the input dtype ({x.dtype})")


def packed_sequences(cu_seqlens: object, shape: tuple[int, ...], total: int, device: torch.device) -> launch.Sequences:
    """Checked ``cu_seqlens`` of a packed batch (batch 1 of ``shape``, ``total`` tokens) as host offsets: one
    device read for a tensor on the inputs' device; a CPU tensor or a list costs none. Offsets given as a
    list or tuple of ints are checked once: the same offsets again get the same object (``REGISTRY.layouts``),
    whose device copies are made once."""
    if shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens the sequences are packed along the tokens in batch 1; got shape {list(shape)}"
        )
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}; allowed: the "
                         "inputs' device or the CPU")  # fmt: skip
    key = layout_key(cu_seqlens, total)
    if key is not None:
        hit = REGISTRY.layouts.get(key)
        if hit is not None:
            return hit
    seqs = launch.Sequences(check_cu_seqlens(cu_seqlens, total).tolist())
    return seqs if key is None else REGISTRY.layouts.put(key, seqs)


def layout_key(cu_seqlens: object, total: object) -> tuple | None:
    """What a layout given as host ints is remembered by (``REGISTRY.layouts``, and the calls of
    :func:`memo_key`), or None: plain ints only (a bool or a traced SymInt takes the checks), not while
    tracing (dynamo would fold the test). Only checked offsets are ever stored under it."""
    if (not torch.compiler.is_compiling() and type(total) is int and isinstance(cu_seqlens, (list, tuple))
            and all(type(v) is int for v in cu_seqlens)):  # fmt: skip
        return (tuple(cu_seqlens), total)
    return None


def check_state(state: object, n: int, x: torch.Tensor, k: int, bl: int, what: str = "initial_state") -> SwrState:
    if not isinstance(state, SwrState):
        raise TypeError(f"{what} must be a swrgen SwrState; got {type(state).__name__}")
    state.check(n, x.shape[1], x.shape[2], k, bl)
    if state.device != x.device:
        raise ValueError(f"{what} is on {state.device} but the inputs are on {x.device}")
    return state


# ---------------------------------------------------------------- running a checked call


def _state_data(state: SwrState, x: torch.Tensor) -> torch.Tensor:
    """The state as the computation takes it: float32 contiguous for the kernels, as it is on the CPU."""
    return state.packed() if x.is_cuda else state.data


def run(ks: KernelSet | str | None, a: torch.Tensor, x: torch.Tensor, k: int, bl: int, out_dtype: torch.dtype,
        seqs: launch.Sequences | None, state: SwrState | None, return_state: bool):  # fmt: skip
    """A checked call: autograd, the custom ops or a direct launch; ``(y, new state)`` with ``return_state``.

    ks: the kernel set (CUDA), its key only (while torch.compile traces), or None (CPU)."""
    data = None if state is None else _state_data(state, x)
    phases = None
    if state is not None and state.host_pos is not None:
        phases = tuple(p % bl for p in state.host_pos)
    call = Call(ks, k, bl, out_dtype, seqs, None if state is None else state.pos, phases, return_state)
    tensors = (a, x) if data is None else (a, x, data)
    if eager_ok():
        if not any(t.requires_grad for t in tensors) or not torch.is_grad_enabled():
            y, data_out, pos_out = forward_call(call, a, x, data)
        else:
            y, data_out, pos_out = _SwrFunction.apply(a, x, data, call)
    else:
        cu = None if seqs is None else torch.tensor(seqs.starts, dtype=torch.int64)
        key = ks if isinstance(ks, str) else ("" if ks is None else ks.key)
        y, data_out, pos_out = _swr_fwd(a, x, data, call.pos, cu, k, bl, key, out_dtype, return_state)
    if not return_state:
        return y
    host = None
    if state is None or state.host_pos is not None:
        start = (0,) * (x.shape[0] if seqs is None else seqs.count) if state is None else state.host_pos
        lengths = [x.shape[-1]] * len(start) if seqs is None else seqs.lengths
        host = tuple(p + n for p, n in zip(start, lengths, strict=True))
    return y, SwrState(data_out, pos_out, bl, host)


class ForwardCall:
    """A validated inference call: the plan to launch, the output dtype and, for a packed call, its layout
    (whose device offsets the plan points at); ``REGISTRY.calls`` keeps these. Called, it launches."""

    __slots__ = ("dtype", "plan", "seqs")

    def __init__(self, plan, dtype: torch.dtype, seqs: launch.Sequences | None = None) -> None:
        self.plan, self.dtype, self.seqs = plan, dtype, seqs

    def run(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # empty_like: about half the host time of torch.empty(shape, ...) (no shape argument to parse).
        y = torch.empty_like(x, dtype=self.dtype, memory_format=torch.contiguous_format)
        self.plan.launch(x.data_ptr(), a.data_ptr(), y.data_ptr())
        return y

    __call__ = run


class TrainCall:
    """A validated training call without a state (dense, or packed with its layout fixed): the forward's
    :class:`ForwardCall` and the backward's plan, made by the first backward whose upstream gradient is laid
    out as autograd hands it (y's dtype, contiguous, 16-byte aligned); another layout takes the general
    backward. ``REGISTRY.calls`` keeps these."""

    __slots__ = ("_bwd", "forward", "ks")

    def __init__(self, ks: KernelSet, forward: ForwardCall) -> None:
        self.ks, self.forward = ks, forward
        self._bwd = None

    def __call__(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _SwrTrainCallFunction.apply(a, x, self)

    def backward(self, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(da, dx) for upstream gradient dy."""
        seqs = self.forward.seqs
        if dy.dtype != self.forward.dtype or not dy.is_contiguous() or dy.data_ptr() % constants.VECTOR_BYTES:
            dy = grad_output(dy, x.shape, self.forward.dtype, x.device)
            dx, da, _ = launch.backward(self.ks, a, x, dy, seqs=seqs)
            return da, dx
        plan = self._bwd
        if plan is None:  # a contiguous aligned dy of y's shape: every such dy gets this plan
            plan = self._bwd = launch.packed_plan(self.ks, launch.backward_plan(self.ks, a, x, dy, seqs), x, seqs)
        dx, da = launch.plain_backward(plan, a, x, dy)
        return da, dx


def _call_key(a: torch.Tensor, x: torch.Tensor, extra: tuple) -> tuple:
    """Everything the checks and the plan read from a call: geometry, device, alignment, ``extra`` arguments."""
    return (x.shape, x.stride(), x.dtype, a.shape, a.stride(), a.dtype, x.get_device(), launch.aligned(x, a), *extra)


def memo_key(a: object, x: object, cu_seqlens: object, extra: tuple) -> tuple[tuple | None, str | None]:
    """(key, mode) under which a call without a state may be remembered in ``REGISTRY.calls`` (mode as
    :func:`fast_path` says), or (None, None). A packed call qualifies when its offsets are host ints: its
    key holds them and the stream its layout's device copies are read on."""
    mode = fast_path(a, x)
    if mode is None:
        return None, None
    if cu_seqlens is not None:
        packed = packed_key(cu_seqlens, x.shape[-1], x.device)
        if packed is None:
            return None, None
        extra = (*extra, *packed)
    return _call_key(a, x, (mode, *extra)), mode


def packed_key(cu_seqlens: object, total: int, device: torch.device) -> tuple | None:
    """What a remembered packed call's key adds (both ops): its offsets, if host ints (:func:`layout_key`),
    and the stream its layout's device copies are read on; or None (such a call is not remembered)."""
    layout = layout_key(cu_seqlens, total)
    return None if layout is None else (layout, launch.on_stream(device))


def _remember(key: tuple, ks: KernelSet, a: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype, train: bool,
              cu_seqlens=None) -> torch.Tensor:  # fmt: skip
    """Run a call without a state whose tensors passed the checks (``train``: with gradients to record;
    ``cu_seqlens``: packed, checked here) and remember it under ``key`` (while plans may be kept)."""
    seqs = None if cu_seqlens is None else packed_sequences(cu_seqlens, tuple(x.shape), x.shape[-1], x.device)
    if x.numel() == 0:  # nothing to launch; an empty training call takes the checked path (autograd)
        if train:
            return run(ks, a, x, ks.spec.recurrence.window_blocks, ks.spec.recurrence.block_len, out_dtype, seqs,
                       None, False)  # fmt: skip
        return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    call = ForwardCall(launch.packed_plan(ks, launch.forward_plan(ks, a, x, seqs), x, seqs), out_dtype, seqs)
    if train:
        call = TrainCall(ks, call)
    if ks.caching:
        REGISTRY.calls.put(key, call)
    return call(a, x)


# ---------------------------------------------------------------- public API


class SwrOp:
    """The compiled SWR of one spec: ``op(a, x) -> y``, differentiable (see :func:`swrgen.swr`)."""

    def __init__(self, kernels: KernelSet) -> None:
        self.kernels = kernels

    @property
    def spec(self) -> Spec:
        return self.kernels.spec

    @property
    def source(self) -> str:
        return self.kernels.program.source

    @property
    def key(self) -> str:
        return self.kernels.key

    def __call__(self, a: torch.Tensor, x: torch.Tensor, *, cu_seqlens=None, initial_state: SwrState | None = None,
                 return_state: bool = False):  # fmt: skip
        """y = SWR(a, x); see ``swrgen.swr`` for cu_seqlens, initial_state and return_state."""
        key = mode = None
        if initial_state is None and return_state is False:
            key, mode = memo_key(a, x, cu_seqlens, ("op", self.kernels.key))
        if key is not None:
            hit = REGISTRY.calls.get(key)
            if hit is not None:  # inputs like these passed the checks below
                return hit(a, x)
        check_tensors(a, x)
        r = self.spec.recurrence
        check_against_spec(self.spec, a, x)
        if x.is_cuda:
            out_dtype = constants.torch_dtype(r.output_dtype)
        else:  # CPU: any floating dtype; output as the spec says, float64 stays float64
            out_dtype = x.dtype if (x.dtype == torch.float64 or r.output_dtype != "fp32") else torch.float32
        if key is not None:
            return _remember(key, self.kernels, a, x, out_dtype, mode == "train", cu_seqlens)
        return _checked(self.kernels if x.is_cuda else None, a, x, r.window_blocks, r.block_len, out_dtype,
                        cu_seqlens, initial_state, return_state)  # fmt: skip

    def __repr__(self) -> str:
        return f"SwrOp(spec={self.spec.name!r}, window_blocks={self.spec.recurrence.window_blocks})"


def _checked(ks, a, x, k, bl, out_dtype, cu_seqlens, initial_state, return_state):
    """Shared tail of ``swr`` and ``SwrOp.__call__``: packed sequences and streaming state, checked."""
    seqs = None if cu_seqlens is None else packed_sequences(cu_seqlens, tuple(x.shape), x.shape[-1], x.device)
    state = None
    if initial_state is not None:
        n = x.shape[0] if seqs is None else seqs.count
        state = check_state(initial_state, n, x, k, bl)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be True or False; got {return_state!r}")
    return run(ks, a, x, k, bl, out_dtype, seqs, state, return_state)


def load(path_or_spec: Spec | str | Path) -> SwrOp:
    """The compiled op for a Spec, a spec YAML file, or a ``swrgen build`` output folder."""
    if isinstance(path_or_spec, Spec):
        return SwrOp(REGISTRY.spec(path_or_spec))
    path = Path(path_or_spec)
    if path.is_dir():
        from swrgen.build import load_generated

        return SwrOp(REGISTRY.add(Program.from_generated(load_generated(path))))
    if path.is_file():
        return SwrOp(REGISTRY.spec(load_spec(path)))
    raise FileNotFoundError(f"no spec file or generated folder at {path}")


def default_kernels(head_dim: int, per_channel: bool, x_dtype: torch.dtype, a_dtype: torch.dtype, k: int, bl: int,
                    out_dtype: torch.dtype, fused_gating: bool = False) -> KernelSet:  # fmt: skip
    """The kernel set of the default spec for these inputs (``fused_gating``: with the Phalanx kernels)."""
    return REGISTRY.default(
        head_dim=head_dim, block_len=bl, window_blocks=k, gate_layout="per_channel" if per_channel else "per_head",
        input_dtype=constants.dtype_name(x_dtype), gate_dtype=constants.dtype_name(a_dtype),
        output_dtype=constants.dtype_name(out_dtype), fused_gating=fused_gating,
    )  # fmt: skip


def default_key(*args) -> str:
    """:func:`default_kernels`' key: a constant to torch.compile (``_dynamo_marked_constant`` is what
    ``torch.compiler.assume_constant_result`` sets; set here so importing swrgen imports no dynamo)."""
    return default_kernels(*args).key


default_key._dynamo_marked_constant = True  # type: ignore[attr-defined]


def swr(a: torch.Tensor, x: torch.Tensor, *, window_blocks: int | None = None, block_len: int | None = None,
        spec: Spec | str | Path | None = None, out_dtype: torch.dtype | None = None, cu_seqlens=None,
        initial_state: SwrState | None = None, return_state: bool = False, cp_group=None):  # fmt: skip
    """Sliding Window Recurrence over the jagged window of ``window_blocks`` tiles of ``block_len`` tokens.

    a: gates [B, H, L] (per head) or [B, H, DH, L] (per channel); x: inputs [B, H, DH, L].
    Returns y [B, H, DH, L]: fp32 by default (``out_dtype`` or the spec may say the input dtype).
    With ``spec`` (a Spec, YAML path or generated folder) the kernel is that spec's; the keyword
    arguments, if given, must agree with it.

    cu_seqlens: int [S+1] offsets (CPU, or on the inputs' device) of sequences packed in a [1, H, DH, T]
    buffer; tiles align to each sequence's start and nothing crosses a boundary.
    initial_state: continue every sequence (batch entry, or packed sequence) after its ``pos`` tokens;
    return_state: also return the state after the call, ``(y, new_state)``. Both are differentiable:
    ``y1, s = swr(a1, x1, return_state=True); y2 = swr(a2, x2, initial_state=s)`` trains like one pass.

    cp_group: context parallelism: a torch.distributed ProcessGroup (or a ``swrgen.distributed.CPContext``)
    whose rank r holds the r-th contiguous slice of every sequence (``cu_seqlens`` then in global offsets);
    see ``swrgen.distributed.context_parallel.swr`` and docs/context-parallel.md.
    """
    if cp_group is not None:  # validated (on every rank at once) and run by swrgen.distributed
        from swrgen.distributed import context_parallel

        return context_parallel.swr(a, x, window_blocks=window_blocks, block_len=block_len, spec=spec,
                                    out_dtype=out_dtype, cu_seqlens=cu_seqlens, initial_state=initial_state,
                                    return_state=return_state, cp_group=cp_group)  # fmt: skip
    key = mode = None
    if spec is None and initial_state is None and return_state is False:
        # The scalar arguments' types too: window_blocks=True must not be served the plan of window_blocks=1.
        key, mode = memo_key(a, x, cu_seqlens, ("swr", window_blocks, block_len, out_dtype, type(window_blocks),
                                                type(block_len)))  # fmt: skip
    if key is not None:
        hit = REGISTRY.calls.get(key)
        if hit is not None:  # inputs and arguments like these passed the checks below
            return hit(a, x)
    check_tensors(a, x)
    if spec is not None:
        op = load(spec)
        r = op.spec.recurrence
        for name, given, have in (("window_blocks", window_blocks, r.window_blocks), ("block_len", block_len,
                                                                                     r.block_len)):  # fmt: skip
            if given is not None and given != have:
                raise ValueError(f"{name}={given!r} disagrees with spec {op.spec.name!r} ({name}={have})")
        check_out_dtype(out_dtype, x)
        if out_dtype is not None and constants.dtype_name(out_dtype) != r.output_dtype:
            raise ValueError(f"out_dtype={out_dtype} disagrees with spec {op.spec.name!r} (output {r.output_dtype})")
        return op(a, x, cu_seqlens=cu_seqlens, initial_state=initial_state, return_state=return_state)
    k, bl = check_window(DEFAULT_WINDOW_BLOCKS if window_blocks is None else window_blocks,
                         DEFAULT_BLOCK_LEN if block_len is None else block_len)  # fmt: skip
    check_out_dtype(out_dtype, x)
    if not x.is_cuda:
        if out_dtype is None:
            out_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return _checked(None, a, x, k, bl, out_dtype, cu_seqlens, initial_state, return_state)
    if x.dtype == torch.float64:
        raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32 inputs")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if torch.compiler.is_compiling():  # the traced graph needs only the kernel set's key (a constant)
        ks = default_key(x.shape[2], a.dim() == 4, x.dtype, a.dtype, k, bl, out_dtype)
    else:
        ks = default_kernels(x.shape[2], a.dim() == 4, x.dtype, a.dtype, k, bl, out_dtype)
    if key is not None:  # a call without a state that passed the checks: remember its plans
        return _remember(key, ks, a, x, out_dtype, mode == "train", cu_seqlens)
    return _checked(ks, a, x, k, bl, out_dtype, cu_seqlens, initial_state, return_state)
