"""Launch mechanics of swrgen.runtime.driver without a GPU (driver calls replaced by fakes)."""

from __future__ import annotations

import pytest
from cuda.bindings import driver as cu

from swrgen.runtime import driver
from swrgen.runtime.params import KernelParams


def _kernel(shared_bytes: int = 0) -> driver.Kernel:
    k = object.__new__(driver.Kernel)  # skips cuModuleGetFunction, which needs a device
    k.name, k.device_index, k.function, k.shared_bytes = "swr_fwd_vec", 0, object(), shared_bytes
    return k


def test_launch_retries_once_after_binding_the_context(monkeypatch) -> None:
    results = [cu.CUresult.CUDA_ERROR_INVALID_CONTEXT, cu.CUresult.CUDA_SUCCESS]
    calls, bound = [], []

    def fake_launch(function, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        calls.append((gx, bx, smem, stream))
        return (results.pop(0),)

    monkeypatch.setattr(driver.cu, "cuLaunchKernel", fake_launch)
    monkeypatch.setattr(driver, "ensure_context", lambda device: bound.append(device.index))
    _kernel(shared_bytes=4096).launch(7, 128, KernelParams(), stream=3)
    assert calls == [(7, 128, 4096, 3), (7, 128, 4096, 3)] and bound == [0]


def test_launch_errors_are_raised_with_the_kernel_name(monkeypatch) -> None:
    monkeypatch.setattr(driver.cu, "cuLaunchKernel", lambda *a: (cu.CUresult.CUDA_ERROR_INVALID_VALUE,))
    with pytest.raises(driver.CudaError, match="launch of swr_fwd_vec failed: CUDA_ERROR_INVALID_VALUE"):
        _kernel().launch(1, 32, KernelParams(), stream=0)


def test_cluster_launch_sets_the_cluster_attribute(monkeypatch) -> None:
    seen = {}

    def fake_ex(config, function, args, extra):
        seen["cluster"] = config.attrs[0].value.clusterDim.x
        seen["grid"], seen["block"], seen["smem"] = config.gridDimX, config.blockDimX, config.sharedMemBytes
        return (cu.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver.cu, "cuLaunchKernelEx", fake_ex)
    _kernel(shared_bytes=512).launch(8, 64, KernelParams(), stream=0, cluster=2)
    assert seen == {"cluster": 2, "grid": 8, "block": 64, "smem": 512}
