"""Real multi-process torch.distributed runs for tests: a pool of CPU worker processes with a gloo group.

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

__all__ = ["CaseFailed", "WorkerPool", "free_port"]


class CaseFailed(AssertionError):
    """A case raised on some rank, or ran past its deadline."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, commands, results, pg_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W workers share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
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
    dist.destroy_process_group()


class WorkerPool:
    """``world`` worker processes in one gloo group (see the module docstring)."""

    def __init__(self, world: int, case_timeout_s: float = 90.0, pg_timeout_s: float = 30.0) -> None:
        self.world, self.case_timeout_s, self.pg_timeout_s = world, case_timeout_s, pg_timeout_s
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
                                                             self.pg_timeout_s), daemon=True)
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
