"""Thin, checked wrappers over cuda.bindings.driver: context, modules, launches.

torch owns the CUDA context (the device's primary context); we only make sure it is
current on this thread, load modules into it and launch on torch's current stream.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from cuda.bindings import driver as cu

from swrgen.constants import DEFAULT_DYNAMIC_SHARED_BYTES
from swrgen.runtime.params import KernelParams

SUCCESS = cu.CUresult.CUDA_SUCCESS


class CudaError(RuntimeError):
    pass


def check(result, what: str):
    err, *rest = result
    if err != cu.CUresult.CUDA_SUCCESS:
        try:
            _, msg = cu.cuGetErrorString(err)
            detail = msg.decode() if isinstance(msg, bytes) else str(msg)
        except Exception:  # no driver library to describe it: the code's name still says what failed
            detail = "no description"
        raise CudaError(f"{what} failed: {err.name} ({detail})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def ensure_context(device: torch.device) -> None:
    """Make torch's primary context for ``device`` current on this thread."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()
    with torch.cuda.device(index):
        torch.cuda.current_stream()  # forces torch to create and bind the primary context
        ctx = check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if ctx is None or int(ctx) == 0:
            dev = check(cu.cuDeviceGet(index), "cuDeviceGet")
            ctx = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


@cache
def multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class Kernel:
    """One __global__ function of a loaded module, launched with a KernelParams struct."""

    def __init__(self, module, name: str, device_index: int, shared_bytes: int = 0) -> None:
        self.name = name
        self.device_index = device_index
        self.shared_bytes = shared_bytes  # dynamic shared memory of every launch
        self.function = check(cu.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
        if shared_bytes > DEFAULT_DYNAMIC_SHARED_BYTES:  # beyond the default a kernel must opt in
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(cu.cuFuncSetAttribute(self.function, attr, shared_bytes), f"shared memory of {name}")

    def max_active_ctas_per_sm(self, threads: int) -> int:
        return check(
            cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, threads, self.shared_bytes),
            f"occupancy of {self.name}",
        )

    def launch(self, grid: int, threads: int, params: KernelParams, stream: int, cluster: int = 1) -> None:
        arg = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        config = None if cluster == 1 else self.cluster_config(grid, threads, cluster)
        self.launch_args(grid, threads, ctypes.addressof(arg), stream, config)

    def cluster_config(self, grid: int, threads: int, cluster: int) -> cu.CUlaunchConfig:
        """The cuLaunchKernelEx config of a cluster launch; ``launch_args`` sets its stream."""
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster, 1, 1
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes = self.shared_bytes
        config.attrs = [attr]
        config.numAttrs = 1
        return config

    def launch_args(self, grid: int, threads: int, args: int, stream: int,
                    config: cu.CUlaunchConfig | None = None) -> None:  # fmt: skip
        """Launch with a prebuilt ``void*[]`` at address ``args``; ``config`` (from ``cluster_config``,
        not shared between threads) for a cluster launch, else None."""
        (err,) = self._launch_once(grid, threads, args, stream, config)
        if err != SUCCESS:
            self.relaunch(err, grid, threads, args, stream, config)

    def relaunch(self, err: cu.CUresult, grid: int, threads: int, args: int, stream: int,
                 config: cu.CUlaunchConfig | None = None) -> None:  # fmt: skip
        """After a launch failed with ``err`` (nothing ran): launch again once the context is bound if
        that was the cause, else raise."""
        if err == cu.CUresult.CUDA_ERROR_INVALID_CONTEXT:
            # A thread that has not touched CUDA yet (e.g. a fresh autograd worker) has no current
            # context: bind torch's primary context of this kernel's device and launch again.
            ensure_context(torch.device("cuda", self.device_index))
            (err,) = self._launch_once(grid, threads, args, stream, config)
        check((err,), f"launch of {self.name}")

    def _launch_once(self, grid: int, threads: int, args: int, stream: int, config: cu.CUlaunchConfig | None) -> tuple:
        if config is None:
            return cu.cuLaunchKernel(self.function, grid, 1, 1, threads, 1, 1, self.shared_bytes, stream, args, 0)
        config.hStream = cu.CUstream(stream)
        return cu.cuLaunchKernelEx(config, self.function, args, 0)


class Module:
    """A cubin loaded into the current context, with its kernels looked up by name."""

    def __init__(self, cubin: bytes, names: tuple[str, ...], device_index: int,
                 shared_bytes: dict[str, int] | None = None) -> None:  # fmt: skip
        self._cubin = cubin  # the driver reads the image during load; keep it alive anyway
        self.handle = check(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
        shared = shared_bytes or {}
        self.kernels = {n: Kernel(self.handle, n, device_index, shared.get(n, 0)) for n in names}
