"""Real multi-process torch.distributed runs for tests (a pool of worker processes in one process group), and
every rank of a context-parallel call simulated in one process (``simulate_swr``, ``simulate_phalanx_gating``).

    with WorkerPool(world=2) as pool:
        results = pool.run(case_fn, arg1, arg2)   # case_fn(rank, world, *args) on every rank, its returns

Workers are started once (``spawn``: each imports torch once) and run one case after another, so many
cases share one start-up. Every case has a deadline: a case that fails on any rank, or does not finish in
time, restarts the pool (a rank stuck in a collective is killed, never waited for) and raises here with
every rank's traceback. The gloo group's own timeout bounds every collective inside the workers, so a
rank waiting for a message that never comes fails on its own too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["CaseFailed", "LocalComm", "WorkerPool", "free_port", "simulate_phalanx_gating", "simulate_swr"]


class CaseFailed(AssertionError):
    """A case raised on some rank, or ran past its deadline."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, commands, results, pg_timeout_s: float, backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W workers share the machine's cores
    try:
        if "nccl" in backend:  # one GPU per rank (batch_isend_irecv needs the current device set)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s))  # fmt: skip
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        item = commands.get()
        if item is None:
            break
        fn, args = item
        try:
            out = fn(rank, world, *args)
            results.put((rank, True, out))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()  # every result is out; skip the slow interpreter teardown (seconds with torch)
    os._exit(0)


class WorkerPool:
    """``world`` worker processes in one process group (see the module docstring); ``backend`` "gloo" (CPU)
    or "nccl" (rank r on GPU r)."""

    def __init__(self, world: int, case_timeout_s: float = 90.0, pg_timeout_s: float = 30.0,
                 backend: str = "gloo") -> None:  # fmt: skip
        self.world, self.case_timeout_s, self.pg_timeout_s = world, case_timeout_s, pg_timeout_s
        self.backend = backend
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._commands = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        port = free_port()
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self._procs = [ctx.Process(target=_worker, args=(r, self.world, port, self._commands[r], self._results,
                                                             self.pg_timeout_s, self.backend), daemon=True)
                           for r in range(self.world)]  # fmt: skip
            for p in self._procs:
                p.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """``fn(rank, world, *args)`` on every rank (``fn`` importable by module and name); every rank's
        return value, in rank order. Raises CaseFailed (and restarts the pool) on any failure or timeout."""
        if not self._procs:
            self._start()
        for q in self._commands:
            q.put((fn, args))
        deadline = timeout_s or self.case_timeout_s
        got: dict[int, tuple[bool, Any]] = {}
        end = time.monotonic() + deadline
        while len(got) < self.world:
            left = end - time.monotonic()
            try:
                rank, ok, payload = self._results.get(timeout=max(0.05, min(1.0, left)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
                if left > 0 and not dead:
                    continue
                self._restart()
                missing = sorted(set(range(self.world)) - set(got))
                why = f"ranks {dead} died" if dead else f"ranks {missing} did not finish within {deadline:.0f} s"
                raise CaseFailed(f"{getattr(fn, '__name__', fn)}: {why}; finished: {self._describe(got)}") from None
            got[rank] = (ok, payload)
        if not all(ok for ok, _ in got.values()):
            self._restart()
            raise CaseFailed(f"{getattr(fn, '__name__', fn)} failed:\n{self._describe(got)}")
        return [got[r][1] for r in range(self.world)]

    @staticmethod
    def _describe(got: dict[int, tuple[bool, Any]]) -> str:
        parts = []
        for r in sorted(got):
            ok, payload = got[r]
            parts.append(f"--- rank {r}: {'ok' if ok else 'FAILED'}\n{payload if not ok else ''}")
        return "\n".join(parts)

    def _restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        for q in getattr(self, "_commands", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- every rank in one process


class LocalComm:
    """The messages of W simulated ranks in one process: a mailbox per (sender, receiver) pair.

    Ranks must run in dependency order (forward: rank 0 first; backward: the last rank first), which is the
    order a one-process simulation runs them in; a receive with no message yet raises instead of waiting.
    """

    def __init__(self, mailbox: dict[tuple[int, int], list], rank: int) -> None:
        self.mailbox, self.rank = mailbox, rank

    def post(self, sends, recvs) -> _LocalBatch:
        for t, peer in sends:
            self.mailbox.setdefault((self.rank, peer), []).append(t.clone())
        return _LocalBatch(self, recvs)


class _LocalBatch:
    def __init__(self, comm: LocalComm, recvs) -> None:
        self.comm, self.recvs = comm, list(recvs)

    def wait_recvs(self) -> None:
        for buf, peer in self.recvs:
            queue_ = self.comm.mailbox.get((peer, self.comm.rank))
            if not queue_:
                raise RuntimeError(f"simulated rank {self.comm.rank} waits for a message from rank {peer} that was "
                                   "never sent (run the ranks in order: forward 0..W-1, backward W-1..0)")  # fmt: skip
            buf.copy_(queue_.pop(0))
        self.recvs = []

    wait = wait_recvs


def simulate_swr(a, x, lengths: list[int], *, window_blocks: int = 2, block_len: int = 16, cu_seqlens=None,
                 out_dtype=None) -> list:  # fmt: skip
    """``swrgen.swr`` context parallel over ``len(lengths)`` simulated ranks in this process (one device):
    rank r gets tokens ``[sum(lengths[:r]), sum(lengths[:r+1]))`` of ``a``, ``x``. Returns every rank's y
    (differentiable: a backward over all of them runs the ranks last to first, as autograd orders later
    nodes first). The same code as across processes but the messages; no process group needed."""
    import torch

    from swrgen.distributed import context_parallel as cp
    from swrgen.distributed.layout import SliceLayout

    cu = None if cu_seqlens is None else cp._global_cu(cu_seqlens)
    if out_dtype is None:
        out_dtype = x.dtype if (x.dtype == torch.float64 and not x.is_cuda) else torch.float32
    mailbox: dict = {}
    grad = torch.is_grad_enabled() and (a.requires_grad or x.requires_grad)
    ys, start = [], 0
    for rank, n in enumerate(lengths):
        layout = SliceLayout.from_lengths(rank, list(lengths), cu)
        a_r, x_r = a[..., start : start + n], x[..., start : start + n]
        run = cp.swr_run(a_r, x_r, window_blocks, block_len, out_dtype, layout, LocalComm(mailbox, rank))
        ys.append(cp.execute(run, (a_r, x_r), grad))
        start += n
    return ys


def simulate_phalanx_gating(P, lengths: list[int], *, heads: int, kv_heads: int | None = None, head_dim: int = 16,
                            window_blocks: int = 2, block_len: int = 16, decay_max: float = 0.8,
                            cu_seqlens=None) -> list:  # fmt: skip
    """``swrgen.phalanx_gating`` over simulated ranks in one process (see :func:`simulate_swr`)."""
    import torch

    from swrgen.distributed import context_parallel as cp
    from swrgen.distributed.layout import SliceLayout
    from swrgen.ops.phalanx.layout import GatingLayout

    gating = GatingLayout(heads, heads if kv_heads is None else kv_heads, head_dim)
    cu = None if cu_seqlens is None else cp._global_cu(cu_seqlens)
    mailbox: dict = {}
    grad = torch.is_grad_enabled() and P.requires_grad
    zs, start = [], 0
    for rank, n in enumerate(lengths):
        layout = SliceLayout.from_lengths(rank, list(lengths), cu)
        P_r = P[:, start : start + n]
        run = cp.phalanx_run(P_r, gating, window_blocks, block_len, decay_max, layout, LocalComm(mailbox, rank))
        zs.append(cp.execute(run, (P_r,), grad))
        start += n
    return zs
