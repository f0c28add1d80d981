"""Launch plans: a kernel launch with everything fixed but the data pointers and the stream.

Small calls are launch-bound (a few microseconds of host time each), so the work that depends only on
shapes, strides and alignment (kernel choice, grid, occupancy, the params struct) is done once per
geometry and kept on the kernel set's device entry (``DeviceKernels.plans``); a launch then writes the
data pointers and calls the driver.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from cuda.bindings import driver as cu

from swrgen import constants
from swrgen.runtime.driver import SUCCESS, Kernel
from swrgen.runtime.params import KernelParams


def _stream_fallback(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's current stream of a device as an int; the raw getter is ~10x cheaper than current_stream().
current_stream: Callable[[int], int] = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _stream_fallback


class LaunchPlan:
    """One kernel, block and cluster, the grid, and the params struct (data pointers unset) with the
    ``void*[1]`` the driver reads it through, both built once.

    ``launch`` writes every data pointer of a plain call (none is left over from an earlier call) and
    launches on the device's current stream. ``launch_fields`` also sets other fields (the size of a packed
    batch) and the grid; ``with_fields`` makes a plan that keeps such fields (one packed layout's). A lock
    covers write + launch, so threads may share a plan: the driver copies the struct during the call
    (cuda-bindings releases the GIL inside it).
    """

    __slots__ = ("_address", "_args", "_config", "_function", "_index", "_lock", "_shared", "cluster", "grid",
                 "grid_cap", "kernel", "params", "threads")  # fmt: skip

    def __init__(self, kernel: Kernel, grid: int, threads: int, cluster: int, params: KernelParams,
                 grid_cap: int | None = None) -> None:  # fmt: skip
        self.kernel, self.grid, self.threads, self.cluster = kernel, grid, threads, cluster
        self.grid_cap = grid_cap  # persistent grids: at most one wave
        self.params = params
        self._args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        self._address = ctypes.addressof(self._args)
        self._config = None if cluster == 1 else kernel.cluster_config(grid, threads, cluster)
        self._function, self._index, self._shared = kernel.function, kernel.device_index, kernel.shared_bytes
        self._lock = threading.Lock()

    @property
    def args_address(self) -> int:
        """Address of the ``void*[1]`` (benchmarks launch through it directly)."""
        return self._address

    def launch(self, x: int = 0, a: int = 0, y: int = 0, dy: int = 0, dx: int = 0, da: int = 0, state: int = 0,
               dbc: int = 0) -> None:  # fmt: skip
        """Launch with these device addresses (``KernelParams`` fields of the same names)."""
        stream = current_stream(self._index)
        p = self.params
        self._lock.acquire()
        try:
            p.x, p.a, p.y, p.dy, p.dx, p.da, p.state, p.dbc = x, a, y, dy, dx, da, state, dbc
            self._launch(self.grid, stream)
        finally:
            self._lock.release()

    def launch_fields(self, fields: dict[str, Any], work: int | None = None) -> None:
        """Launch with these ``KernelParams`` fields set (every pointer field not named is null); ``work``:
        the call's work items, which size the grid (packed batches), else the plan's own."""
        stream = current_stream(self._index)
        p = self.params
        with self._lock:
            for name in _POINTERS:
                setattr(p, name, 0)
            for name, value in fields.items():
                setattr(p, name, value)
            grid = self.grid
            if work is not None:
                p.work = work
                grid = grid_for(work, self.threads // constants.WARP_SIZE, self.cluster, self.grid_cap)
            if grid:
                self._launch(grid, stream)

    def with_fields(self, fields: dict[str, Any], work: int) -> LaunchPlan:
        """A copy of this plan whose params also hold ``fields`` (every other pointer field null) and whose
        grid covers ``work`` items: ``launch`` then writes only the plain call's pointers around them."""
        with self._lock:  # not while another thread writes a launch's fields
            params = type(self.params).from_buffer_copy(self.params)
        for name in _POINTERS:
            setattr(params, name, 0)
        for name, value in fields.items():
            setattr(params, name, value)
        params.work = work
        grid = grid_for(work, self.threads // constants.WARP_SIZE, self.cluster, self.grid_cap)
        return LaunchPlan(self.kernel, grid, self.threads, self.cluster, params, grid_cap=self.grid_cap)

    def _launch(self, grid: int, stream: int) -> None:
        if self._config is None:  # the common case inline: one Python frame less per launch
            (err,) = cu.cuLaunchKernel(self._function, grid, 1, 1, self.threads, 1, 1, self._shared, stream,
                                       self._address, 0)  # fmt: skip
            if err != SUCCESS:
                self.kernel.relaunch(err, grid, self.threads, self._address, stream)
        else:
            self._config.gridDimX = grid
            self.kernel.launch_args(grid, self.threads, self._address, stream, self._config)


_POINTERS = tuple(name for name, kind in KernelParams._fields_ if kind is ctypes.c_void_p)


def grid_for(work: int, warps_per_cta: int, cluster: int, cap: int | None) -> int:
    """CTAs for ``work`` warp items: whole clusters, at most ``cap`` (a persistent grid's one wave)."""
    ctas = -(-work // warps_per_cta)
    if cap is not None:
        ctas = min(ctas, cap)
    return -(-ctas // cluster) * cluster  # whole clusters; spare warps find no work


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PlanCache(Generic[K, V]):
    """A dict of plans bounded to ``maxsize`` entries (the oldest goes first).

    ``get`` is the dict's own (no Python frame on the hot path); ``put`` takes a lock, so concurrent
    misses never see the dict change size during the eviction. Plans are cheap to rebuild, and a steady
    loop sees few geometries, so a plain FIFO is enough.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1; got {maxsize}")
        self.maxsize = maxsize
        self._plans: dict[K, V] = {}
        self._lock = threading.Lock()
        self.get: Callable[[K], V | None] = self._plans.get

    def put(self, key: K, plan: V) -> V:
        with self._lock:
            if key not in self._plans:
                while len(self._plans) >= self.maxsize:
                    del self._plans[next(iter(self._plans))]
            self._plans[key] = plan
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def values(self) -> list[V]:
        """The plans kept (a copy: introspection and tests)."""
        return list(self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)

    def __contains__(self, key: Any) -> bool:
        return key in self._plans
