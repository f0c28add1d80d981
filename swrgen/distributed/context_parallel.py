"""Context parallelism for ``swrgen.swr`` and ``swrgen.phalanx_gating`` on torch.distributed.

Each rank of a group holds a contiguous slice of every sequence (rank r the r-th slice; any lengths,
0 included). A token sees at most k*BL tokens back, so all that crosses a rank edge is the SWR state of
the sequence that crosses it (``[rows, H, DH, 2 + 2(k-1)]``, O(k*DH) per head) forward, and its gradient
backward, whatever the sequence length. docs/context-parallel.md has the design and the cost model.

Forward, on rank r (``_forward``):

1. the state its slice hands on depends only on its last k-1 complete tiles and its trailing partial tile
   (tiles aligned to the sequence's start), so a small call on that *tail* (from a tile edge) computes it,
   and it goes to rank r+1 at once;
2. in the same batch of point-to-point operations the incoming state arrives from rank r-1;
3. the main call runs the whole slice from it (``forward_call`` with the incoming state).

A *short* slice (fewer than k-1 complete tiles after its first tile edge) hands on a state that depends
on the one it receives: it waits, runs, and then sends (a chain through short slices serializes, as it
must). Backward mirrors it (``_backward``): the gradient of the incoming state depends only on the slice's
first k tiles (a small backward on that *head* with the incoming state) and goes to rank r-1 first; then
the gradient of the outgoing state arrives from rank r+1 and the main backward injects it
(``d_new_data``). Short slices wait for it first.

Packed sequences (``cu_seqlens`` in global offsets) may start and end anywhere relative to the rank edges:
only a sequence that crosses an edge carries a state across it, and every other piece of a slice starts
from the zero state. The slice layout comes from one all-gather of the slice lengths per call (which also
checks that the ranks agree, see :mod:`swrgen.distributed.layout`), or once per batch with
:func:`cp_context`, whose result every layer can take as ``cp_group``.

The first rank starts from the zero state: ``initial_state`` and ``return_state`` are not supported with
a ``cp_group``. Results equal one process running the whole sequences: bit for bit on the CPU (the
states travel in float64 there), to rounding on CUDA (float32 states, as in a single-GPU continuation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from swrgen import constants
from swrgen.distributed import layout as lay
from swrgen.distributed.layout import ContextParallelError, SliceLayout, SlicePlan, agree
from swrgen.ops.phalanx import op as phalanx_op
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr import launch
from swrgen.ops.swr import op as swr_op
from swrgen.ops.swr.state import state_width
from swrgen.ops.swr.varlen import check_cu_seqlens

__all__ = ["CPContext", "HaloTimer", "cp_context", "phalanx_gating", "swr"]

#: Passed to every point-to-point ``wait`` (None: the process group's own timeout).
P2P_TIMEOUT: timedelta | None = None


# ---------------------------------------------------------------- the group, the layout


@dataclass(frozen=True)
class CPContext:
    """A batch's slice layout on a context-parallel group, agreed once by :func:`cp_context`.

    Pass it as ``cp_group`` to every layer of a step: the layers then skip the per-call all-gather and
    check only that their slice matches it (locally: a rank whose call does not match raises, and its
    peers fail at the point-to-point timeout instead of getting the same message).
    """

    group: dist.ProcessGroup
    layout: SliceLayout


def _group_of(cp_group: object) -> tuple[dist.ProcessGroup, CPContext | None]:
    if isinstance(cp_group, CPContext):
        return cp_group.group, cp_group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cp_group needs an initialized torch.distributed (dist.init_process_group first)")
    if not isinstance(cp_group, dist.ProcessGroup):
        raise TypeError(f"cp_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD, or "
                        f"DeviceMesh.get_group()) or a swrgen CPContext; got {type(cp_group).__name__}")  # fmt: skip
    return cp_group, None


def _global_cu(cu_seqlens: object) -> tuple[int, ...]:
    """Checked global ``cu_seqlens`` as host ints (one device read for a CUDA tensor)."""
    try:
        last = int(cu_seqlens[-1])  # type: ignore[index]
    except (TypeError, IndexError, ValueError, RuntimeError) as err:
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a sequence of ints; got {cu_seqlens!r}") from err
    return tuple(check_cu_seqlens(cu_seqlens, last).tolist())  # type: ignore[arg-type]


def _check_length(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    return value


@torch.compiler.disable
def cp_context(group: dist.ProcessGroup, length: int, cu_seqlens=None) -> CPContext:
    """Agree on the slice layout of one batch: this rank holds ``length`` tokens (of every batch entry, or of
    the packed buffer with global ``cu_seqlens``). One all-gather; every rank must call it (it is a
    collective) and gets a ContextParallelError if the slices do not add up or the ranks disagree."""
    group, _ = _group_of(group)
    meta, error, cu = None, None, None
    try:
        _check_length("length", length)
        cu = None if cu_seqlens is None else _global_cu(cu_seqlens)
        meta = {"kind": 0, "length": length, **_packed_meta(cu)}
    except (TypeError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    metas = agree(group, meta, error)
    layout = SliceLayout.from_lengths(dist.get_rank(group), [m["length"] for m in metas], cu)
    return CPContext(group, layout)


def _packed_meta(cu: tuple[int, ...] | None) -> dict[str, int]:
    if cu is None:
        return {"sequences": -1, "total": -1, "cu_digest": 0}
    return {"sequences": len(cu) - 1, "total": cu[-1], "cu_digest": lay.cu_digest(cu)}


def _check_backend(group: dist.ProcessGroup, device: torch.device) -> None:
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        raise ValueError(f"CPU tensors need a process group with a gloo backend; cp_group has {backend!r} (allowed: "
                         "dist.new_group(backend='gloo'), or init_process_group('cpu:gloo,cuda:nccl'))")  # fmt: skip
    if device.type == "cuda" and backend == "gloo":
        raise ValueError("CUDA tensors need a process group with an NCCL backend; cp_group has 'gloo'")


def _resolve(group: dist.ProcessGroup, ctx: CPContext | None, checks: Callable[[], dict],
             length: int) -> tuple[dict, SliceLayout]:  # fmt: skip
    """Run the local ``checks`` (-> their results, with "meta") and agree on the layout: with a context
    locally (errors raise here), else by one all-gather (errors raise on every rank)."""
    if ctx is not None:
        out = checks()
        layout = ctx.layout
        if length != layout.length:
            raise ContextParallelError(f"this rank's slice has {length} tokens but the CPContext gives it "
                                       f"{layout.length} (rank {layout.rank}); allowed: the context's")  # fmt: skip
        if out["cu"] != layout.cu_seqlens:
            raise ContextParallelError("cu_seqlens differ from the CPContext's (pass the same global offsets, or "
                                       "None for a dense context)")  # fmt: skip
        return out, layout
    out, error = None, None
    try:
        out = checks()
    except (TypeError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    metas = agree(group, None if out is None else out["meta"], error)
    assert out is not None  # agree raised otherwise
    return out, SliceLayout.from_lengths(dist.get_rank(group), [m["length"] for m in metas], out["cu"])


def _reject_unsupported(spec: object, initial_state: object, return_state: object) -> None:
    if spec is not None:
        raise ValueError("spec= is not supported with cp_group (the default kernels run); allowed: spec=None")
    if initial_state is not None:
        raise ValueError("initial_state is not supported with cp_group: rank 0 starts every sequence from the "
                         "zero state, each rank from the state of the ranks before it; allowed: None")  # fmt: skip
    if return_state is not False:
        raise ValueError("return_state is not supported with cp_group (the state after the sequences would live on "
                         "the last rank); allowed: return_state=False")  # fmt: skip


# ---------------------------------------------------------------- one op's computation on parts of a slice


class _Part:
    """An op's computation on (parts of) a rank's slice: no autograd, no communication."""

    n_inputs: int

    def __init__(self, ks, k: int, bl: int, heads: int, head_dim: int, device: torch.device) -> None:
        self.ks, self.k, self.bl, self.heads, self.head_dim, self.device = ks, k, bl, heads, head_dim, device
        # float64 on the CPU: states travel exactly; the kernels read and write float32.
        self.state_dtype = torch.float32 if device.type == "cuda" else torch.float64

    def state(self, rows: int, fresh: bool) -> torch.Tensor:
        """A state buffer of ``rows`` rows: zeros, or the state at a tile edge (w = 0, g = 1)."""
        data = torch.zeros(rows, self.heads, self.head_dim, state_width(self.k), dtype=self.state_dtype,
                           device=self.device)  # fmt: skip
        if fresh:
            data[..., 1] = 1.0
        return data

    def positions(self, pos: tuple[int, ...]) -> torch.Tensor:
        return launch.upload(list(pos), self.device)

    def seqs(self, plan: SlicePlan) -> launch.Sequences | None:
        return None if plan.starts is None else launch.Sequences(list(plan.starts))

    # Per op: narrow, narrow_out (the output gradient), empty_out, zero_grads, forward, backward.


class _SwrPart(_Part):
    n_inputs = 2

    def __init__(self, ks, k: int, bl: int, out_dtype: torch.dtype, x: torch.Tensor) -> None:
        super().__init__(ks, k, bl, x.shape[1], x.shape[2], x.device)
        self.out_dtype = out_dtype

    def narrow(self, inputs, start: int, n: int):
        a, x = inputs
        return a[..., start : start + n], x[..., start : start + n]

    def narrow_out(self, dy: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return dy[..., start : start + n]

    def empty_out(self, inputs) -> torch.Tensor:
        return torch.empty_like(inputs[1], dtype=self.out_dtype, memory_format=torch.contiguous_format)

    def zero_grads(self, inputs):
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in inputs)

    def _call(self, seqs, pos, want_state: bool) -> swr_op.Call:
        phases = None if pos is None else tuple(p % self.bl for p in pos)
        pos_t = None if pos is None else self.positions(pos)
        return swr_op.Call(self.ks, self.k, self.bl, self.out_dtype, seqs, pos_t, phases, want_state)

    def forward(self, inputs, seqs, data, pos, want_state: bool):
        a, x = inputs
        y, new, _ = swr_op.forward_call(self._call(seqs, pos, want_state), a, x, data)
        return y, new

    def backward(self, inputs, seqs, data, pos, dy, d_new, want_d_state: bool):
        a, x = inputs
        dy = swr_op.grad_output(dy, x.shape, self.out_dtype, x.device)
        da, dx, d_state = swr_op.backward_call(self._call(seqs, pos, False), a, x, data, dy, d_new, want_d_state)
        return (da, dx), d_state


class _PhalanxPart(_Part):
    n_inputs = 1

    def __init__(self, ks, k: int, bl: int, layout: GatingLayout, decay_max: float, P: torch.Tensor) -> None:
        super().__init__(ks, k, bl, layout.heads, layout.head_dim, P.device)
        self.layout, self.decay_max = layout, decay_max

    def narrow(self, inputs, start: int, n: int):
        return (inputs[0][:, start : start + n],)

    def narrow_out(self, dZ: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return dZ[:, start : start + n]

    def empty_out(self, inputs) -> torch.Tensor:
        P = inputs[0]
        return P.new_empty((P.shape[0], P.shape[1], self.layout.inner))

    def zero_grads(self, inputs):
        return (torch.zeros_like(inputs[0], memory_format=torch.contiguous_format),)

    def _call(self, seqs, pos, want_state: bool) -> phalanx_op.Call:
        phases = None if pos is None else tuple(p % self.bl for p in pos)
        pos_t = None if pos is None else self.positions(pos)
        return phalanx_op.Call(self.ks, self.layout, self.k, self.bl, self.decay_max, seqs, pos_t, phases,
                               want_state)  # fmt: skip

    def forward(self, inputs, seqs, data, pos, want_state: bool):
        Z, new, _ = phalanx_op.forward_call(self._call(seqs, pos, want_state), inputs[0], data)
        return Z, new

    def backward(self, inputs, seqs, data, pos, dZ, d_new, want_d_state: bool):
        P = inputs[0]
        dZ = swr_op.grad_output(dZ, (*P.shape[:-1], self.layout.inner), P.dtype, P.device)
        dP, d_state = phalanx_op.backward_call(self._call(seqs, pos, False), P, dZ, data, d_new, want_d_state)
        return (dP,), d_state


# ---------------------------------------------------------------- timing (the benchmark's halo breakdown)


class HaloTimer:
    """Marks the halo (state exchange and the small head/tail calls) apart from the main calls.

    Set ``swrgen.distributed.context_parallel.TIMER = HaloTimer()``; every call then records, per direction,
    ``start`` (before the tail / head call), ``halo`` (the incoming state or gradient has arrived) and
    ``end`` (after the main call): CUDA events on the current stream on CUDA (read them after a
    synchronize), host times on the CPU. :meth:`totals` sums halo and main milliseconds per direction.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[str, str, object]] = []

    def mark(self, direction: str, name: str, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((direction, name, event))
        else:
            self.marks.append((direction, name, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        """{"fwd_halo_ms", "fwd_main_ms", "bwd_halo_ms", "bwd_main_ms"} summed over every recorded call."""
        out = {f"{d}_{p}_ms": 0.0 for d in ("fwd", "bwd") for p in ("halo", "main")}
        last: dict[str, object] = {}
        for direction, name, stamp in self.marks:
            if name != "start":
                part = "halo" if name == "halo" else "main"
                prev = last[direction]
                if isinstance(stamp, float):
                    ms = (stamp - prev) * 1e3  # type: ignore[operator]
                else:
                    ms = prev.elapsed_time(stamp)  # type: ignore[union-attr]
                out[f"{direction}_{part}_ms"] += ms
            last[direction] = stamp
        return out

    def clear(self) -> None:
        self.marks.clear()


TIMER: HaloTimer | None = None


def _mark(direction: str, name: str, device: torch.device) -> None:
    if TIMER is not None:
        TIMER.mark(direction, name, device)


# ---------------------------------------------------------------- point-to-point exchange


class _Batch:
    """One ``batch_isend_irecv``: every op of a rank goes through it (the NCCL backend puts batched and
    single point-to-point operations on different communicators, so the two must never meet on an edge)."""

    def __init__(self, group: dist.ProcessGroup, sends: list[tuple[torch.Tensor, int]],
                 recvs: list[tuple[torch.Tensor, int]]) -> None:  # fmt: skip
        ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for t, p in recvs]
        self.n_sends = len(sends)
        self.works = dist.batch_isend_irecv(ops) if ops else []
        self.coalesced = len(self.works) != len(ops)  # NCCL: one work for the whole batch

        self.waited: set[int] = set()

    def _wait(self, indices: range) -> None:
        for i in indices:
            if i in self.waited:  # gloo: a second wait on a finished recv waits for another message
                continue
            self.waited.add(i)
            if P2P_TIMEOUT is None:
                self.works[i].wait()
            else:
                self.works[i].wait(timeout=P2P_TIMEOUT)

    def wait_recvs(self) -> None:
        self._wait(range(len(self.works)) if self.coalesced else range(self.n_sends, len(self.works)))

    def wait(self) -> None:
        self._wait(range(len(self.works)))


# ---------------------------------------------------------------- one call on one rank


class GroupComm:
    """Point-to-point messages between neighbouring ranks of a process group."""

    def __init__(self, group: dist.ProcessGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> _Batch:
        """Start sending / receiving ``(tensor, group rank)`` pairs; returns what to wait on."""
        return _Batch(self.group, sends, recvs)


class _Run:
    """One context-parallel call on this rank: its op, plan and messages (kept from forward to backward)."""

    def __init__(self, part: _Part, plan: SlicePlan, comm: GroupComm) -> None:
        self.part, self.plan, self.comm = part, plan, comm
        self.prev, self.next = comm.rank - 1, comm.rank + 1
        self.seqs = part.seqs(plan)

    def main_state(self, data_in: torch.Tensor | None) -> torch.Tensor | None:
        """The main call's state: the incoming one for the first piece, a fresh one for later pieces."""
        if data_in is None:
            return None
        plan = self.plan
        if plan.starts is None or len(plan.starts) <= 2:
            return data_in
        return torch.cat([data_in, self.part.state(len(plan.starts) - 2, fresh=True)])

    def tail_state(self, inputs) -> torch.Tensor:
        """The state this slice hands on, from its tail alone (a long slice)."""
        plan, part = self.plan, self.part
        n = plan.length - plan.tail_start
        fresh = part.state(plan.rows, fresh=True)
        if n == 0:  # k = 1 at a tile edge: the state is the fresh one
            return fresh
        tail = part.narrow(inputs, plan.tail_start, n)
        _, new = part.forward(tail, None, fresh, (plan.tail_pos,) * plan.rows, True)
        return new.contiguous()

    def head_grad(self, inputs, data_in: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        """The incoming state's gradient, from the head alone (a long slice)."""
        plan, part = self.plan, self.part
        n = plan.head_end
        if n == 0:  # k = 1 at a tile edge: nothing reads the incoming state
            return part.state(plan.rows, fresh=False)
        head = part.narrow(inputs, 0, n)
        d_head = part.narrow_out(dout, 0, n)
        _, d = part.backward(head, None, data_in, (plan.pos[0],) * plan.rows, d_head, None, True)
        return d.contiguous()

    def forward(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan, part = self.plan, self.part
        _mark("fwd", "start", part.device)
        sends = [(self.tail_state(inputs), self.next)] if plan.send and not plan.short else []
        data_in = part.state(plan.rows, fresh=False) if plan.recv else None
        batch = self.comm.post(sends, [(data_in, self.prev)] if data_in is not None else [])
        batch.wait_recvs()
        _mark("fwd", "halo", part.device)
        later = None
        if plan.short:  # the state it hands on needs the one it got: run, then send
            if plan.length == 0:
                out, new = part.empty_out(inputs), data_in
            else:
                out, new_all = part.forward(inputs, self.seqs, self.main_state(data_in), plan.pos, True)
                new = new_all[-plan.rows :].contiguous()
            later = self.comm.post([(new, self.next)], [])
        elif plan.length == 0:
            out = part.empty_out(inputs)
        else:
            out, _ = part.forward(inputs, self.seqs, self.main_state(data_in), plan.pos if plan.recv else None, False)
        _mark("fwd", "end", part.device)
        batch.wait()
        if later is not None:
            later.wait()
        return out, data_in

    def backward(self, inputs, data_in: torch.Tensor | None, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan, part = self.plan, self.part
        _mark("bwd", "start", part.device)
        sends = []
        if plan.recv and not plan.short:
            sends.append((self.head_grad(inputs, data_in, dout), self.prev))
        d_out = part.state(plan.rows, fresh=False) if plan.send else None
        batch = self.comm.post(sends, [(d_out, self.next)] if d_out is not None else [])
        batch.wait_recvs()
        _mark("bwd", "halo", part.device)
        d_new = d_out
        if d_out is not None and plan.starts is not None and len(plan.starts) > 2:  # the last piece's
            d_new = torch.cat([part.state(len(plan.starts) - 2, fresh=False), d_out])
        later = None
        if plan.length == 0:
            grads, d_state = part.zero_grads(inputs), d_out
        else:
            grads, d_state = part.backward(inputs, self.seqs, self.main_state(data_in),
                                           plan.pos if plan.recv else None, dout, d_new, plan.short)  # fmt: skip
        if plan.short:
            later = self.comm.post([(d_state[: plan.rows].contiguous(), self.prev)], [])
        _mark("bwd", "end", part.device)
        batch.wait()
        if later is not None:
            later.wait()
        return grads


class _ContextParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, *inputs):
        out, data_in = run.forward(inputs)
        ctx.run = run
        ctx.has_state = data_in is not None
        ctx.save_for_backward(*inputs, *([data_in] if data_in is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout):
        run: _Run = ctx.run
        saved = ctx.saved_tensors
        n = run.part.n_inputs
        grads = run.backward(saved[:n], saved[n] if ctx.has_state else None, dout)
        return (None, *grads)


def execute(run: _Run, inputs: tuple[torch.Tensor, ...], grad: bool) -> torch.Tensor:
    if grad:
        return _ContextParallelFunction.apply(run, *inputs)
    out, _ = run.forward(inputs)
    return out


# ---------------------------------------------------------------- public entry points


@torch.compiler.disable
def swr(a: torch.Tensor, x: torch.Tensor, *, window_blocks: int | None = None, block_len: int | None = None,
        spec=None, out_dtype: torch.dtype | None = None, cu_seqlens=None, initial_state=None,
        return_state: bool = False, cp_group) -> torch.Tensor:  # fmt: skip
    """``swrgen.swr`` on this rank's slice of sequences split across the ranks of ``cp_group``.

    a, x: this rank's slice ([B, H, L_r] / [B, H, DH, L_r] and [B, H, DH, L_r]; packed: batch 1 and
    ``cu_seqlens`` in global offsets). Returns y of the slice, equal to the same tokens of one process
    running the concatenation of every rank's slice; differentiable in a and x. Every rank must call it
    (a collective), with the same arguments but for the slice, and run its backward if one rank does.
    ``cp_group``: a ProcessGroup (one all-gather of the slice lengths per call, which checks that the
    ranks agree) or a :class:`CPContext`.
    """
    group, ctx = _group_of(cp_group)
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (a, x))

    def checks() -> dict:
        _reject_unsupported(spec, initial_state, return_state)
        swr_op.check_tensors(a, x)
        k, bl = swr_op.check_window(swr_op.DEFAULT_WINDOW_BLOCKS if window_blocks is None else window_blocks,
                                    swr_op.DEFAULT_BLOCK_LEN if block_len is None else block_len)  # fmt: skip
        swr_op.check_out_dtype(out_dtype, x)
        if x.is_cuda and x.dtype == torch.float64:
            raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32 inputs")
        if out_dtype is not None:
            dt = out_dtype
        else:
            dt = x.dtype if (x.dtype == torch.float64 and not x.is_cuda) else torch.float32
        cu = None if cu_seqlens is None else _global_cu(cu_seqlens)
        if cu is not None and x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along the tokens in batch 1; got x "
                             f"{list(x.shape)}")  # fmt: skip
        _check_backend(group, x.device)
        batch, heads, head_dim, length = x.shape
        meta = {"kind": 1, "length": length, "batch": batch, "heads": heads, "head_dim": head_dim,
                "gates": head_dim if a.dim() == 4 else 1, "window_blocks": k, "block_len": bl,
                "dtype": lay.dtype_code(x.dtype), "gate_dtype": lay.dtype_code(a.dtype),
                "out_dtype": lay.dtype_code(dt), "grad": int(grad), "device": int(x.is_cuda),
                **_packed_meta(cu)}  # fmt: skip
        return {"meta": meta, "k": k, "bl": bl, "out_dtype": dt, "cu": cu}

    length = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 1 else -1
    args, layout = _resolve(group, ctx, checks, length)
    run = swr_run(a, x, args["k"], args["bl"], args["out_dtype"], layout, GroupComm(group, layout.rank))
    return execute(run, (a, x), grad)


def swr_run(a: torch.Tensor, x: torch.Tensor, k: int, bl: int, out_dtype: torch.dtype, layout: SliceLayout,
            comm) -> _Run:  # fmt: skip
    """The run of a checked swr call on ``layout.rank`` with messages through ``comm`` (a GroupComm, or the
    in-process one of :mod:`swrgen.distributed.testing`)."""
    ks = swr_op.default_kernels(x.shape[2], a.dim() == 4, x.dtype, a.dtype, k, bl, out_dtype) if x.is_cuda else None
    plan = lay.slice_plan(layout, x.shape[0], k, bl)
    return _Run(_SwrPart(ks, k, bl, out_dtype, x), plan, comm)


@torch.compiler.disable
def phalanx_gating(P: torch.Tensor, *, heads: int, kv_heads: int | None = None, head_dim: int = 16,
                   window_blocks: int = 2, block_len: int = 16, decay_max: float = 0.8, spec=None, cu_seqlens=None,
                   initial_state=None, return_state: bool = False, cp_group) -> torch.Tensor:  # fmt: skip
    """``swrgen.phalanx_gating`` on this rank's slice P [B, L_r, N] of sequences split across ``cp_group``
    (packed: batch 1, ``cu_seqlens`` in global offsets). Returns Z of the slice; differentiable in P. The
    same rules as :func:`swr`."""
    group, ctx = _group_of(cp_group)
    grad = torch.is_grad_enabled() and isinstance(P, torch.Tensor) and P.requires_grad

    def checks() -> dict:
        _reject_unsupported(spec, initial_state, return_state)
        layout = GatingLayout(heads, heads if kv_heads is None else kv_heads, head_dim)
        phalanx_op.check_projections(P, layout, decay_max)
        k, bl = swr_op.check_window(window_blocks, block_len)
        if P.is_cuda:
            if P.dtype == torch.float64:
                raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32")
            if head_dim != constants.CHANNELS_PER_WARP:
                raise ValueError(f"the fused CUDA kernels take head_dim {constants.CHANNELS_PER_WARP}; got {head_dim}")
        cu = None if cu_seqlens is None else _global_cu(cu_seqlens)
        if cu is not None and P.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along the tokens in batch 1; got P "
                             f"{list(P.shape)}")  # fmt: skip
        _check_backend(group, P.device)
        meta = {"kind": 2, "length": P.shape[1], "batch": P.shape[0], "heads": layout.heads,
                "head_dim": layout.head_dim, "gates": layout.kv_heads, "window_blocks": k, "block_len": bl,
                "dtype": lay.dtype_code(P.dtype), "out_dtype": lay.dtype_code(P.dtype), "grad": int(grad),
                "device": int(P.is_cuda), "decay_max": lay.float_code(decay_max), **_packed_meta(cu)}  # fmt: skip
        return {"meta": meta, "layout": layout, "k": k, "bl": bl, "cu": cu}

    length = P.shape[1] if isinstance(P, torch.Tensor) and P.dim() >= 2 else -1
    args, layout = _resolve(group, ctx, checks, length)
    run = phalanx_run(P, args["layout"], args["k"], args["bl"], float(decay_max), layout,
                      GroupComm(group, layout.rank))  # fmt: skip
    return execute(run, (P,), grad)


def phalanx_run(P: torch.Tensor, gating: GatingLayout, k: int, bl: int, decay_max: float, layout: SliceLayout,
                comm) -> _Run:  # fmt: skip
    """The run of a checked phalanx_gating call (see :func:`swr_run`)."""
    ks = None
    if P.is_cuda:
        ks = swr_op.default_kernels(gating.head_dim, False, P.dtype, P.dtype, k, bl, P.dtype, True)
    plan = lay.slice_plan(layout, P.shape[0], k, bl)
    return _Run(_PhalanxPart(ks, k, bl, gating, decay_max, P), plan, comm)
