"""Launch plans and the public ops' plan caches, without a GPU: the launcher and the tuned-program lookup are
replaced by fakes, and CPU tensors pass for CUDA ones (``is_cuda`` patched), so what is tested is the
caching logic: keys, bounds, the ``is_compiling`` guard, thread safety and invalidation by the tuned store."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

import swrgen
from swrgen.ops import fastpath
from swrgen.ops.phalanx import launch as fused_launch
from swrgen.ops.phalanx import op as fused_op
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr import launch
from swrgen.ops.swr import op as swr_op
from swrgen.runtime import driver, plan
from swrgen.runtime.params import KernelParams
from swrgen.runtime.program import Program
from swrgen.spec import Spec, default_spec
from swrgen.tune import store


def _inputs(B=1, H=2, DH=16, L=32, dtype=torch.bfloat16, per_channel=False):
    a = torch.rand((B, H, DH, L) if per_channel else (B, H, L)).to(dtype)
    return a, torch.randn(B, H, DH, L).to(dtype)


# --- keys ----------------------------------------------------------------------------------------------


def test_plan_key_distinguishes_what_checks_and_plans_read() -> None:
    a, x = _inputs(B=2, H=3)
    base = swr_op._plan_key(a, x, "k")
    assert swr_op._plan_key(a.clone(), x.clone(), "k") == base  # data does not matter
    permuted = x.transpose(0, 1).contiguous().transpose(0, 1)  # same shape, other batch/head strides
    assert permuted.shape == x.shape and swr_op._plan_key(a, permuted, "k") != base
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    unaligned = storage[1:].view(x.shape)  # base off a 16-byte boundary
    assert unaligned.data_ptr() % 16 and swr_op._plan_key(a, unaligned, "k") != base
    assert swr_op._plan_key(a.float(), x, "k") != base  # gate dtype
    assert swr_op._plan_key(a, x.half(), "k") != base  # input dtype
    a4, _ = _inputs(B=2, H=3, per_channel=True)
    assert swr_op._plan_key(a4, x, "k") != base  # gate layout
    assert swr_op._plan_key(a, x, "other op") != base
    assert swr_op._plan_key(a, x[..., :16], "k") != base  # shape


def test_fused_geometry_distinguishes_strides_and_alignment() -> None:
    layout = GatingLayout(2, 2, 16)
    P = torch.randn(2, 8, layout.width).bfloat16()
    base = fused_op._geometry(P)
    padded = torch.randn(2, 8, layout.width + 8).bfloat16()[..., : layout.width]
    assert fused_op._geometry(padded) != base
    shifted = torch.empty(P.numel() + 1, dtype=P.dtype)[1:].view(P.shape)
    assert fused_op._geometry(shifted) != base
    assert fused_op._geometry(P.half()) != base


def test_fresh_rows_aligned_matches_rows_aligned() -> None:
    for shape in [(1, 1, 16, 3), (2, 3, 16, 5), (2, 1, 16, 8), (3, 2, 32, 17), (1, 5, 16, 1)]:
        for dtype in (torch.bfloat16, torch.float32):
            t = torch.empty(shape, dtype=dtype)
            if t.data_ptr() % 16 == 0:
                assert launch.fresh_rows_aligned(shape, t.element_size()) == launch.rows_aligned(t), (shape, dtype)


# --- PlanCache and LaunchPlan ----------------------------------------------------------------------------


def test_plan_cache_is_bounded_oldest_first() -> None:
    cache = plan.PlanCache(3)
    for i in range(5):
        assert cache.put(i, f"plan{i}") == f"plan{i}"
    assert len(cache) == 3 and cache.get(0) is None and cache.get(1) is None
    assert [cache.get(i) for i in (2, 3, 4)] == ["plan2", "plan3", "plan4"]
    cache.put(3, "again")  # replacing a key evicts nothing
    assert len(cache) == 3 and cache.get(2) == "plan2" and cache.get(3) == "again"
    with pytest.raises(ValueError, match="maxsize"):
        plan.PlanCache(0)


def test_plan_cache_concurrent_puts_stay_bounded() -> None:
    cache = plan.PlanCache(16)

    def fill(offset: int) -> None:
        for i in range(2000):
            cache.put((offset, i), i)
            cache.get((offset, i - 1))

    threads = [threading.Thread(target=fill, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 16


class _FakeDriver:
    """cuLaunchKernel / a kernel's cluster launch that record what the driver would read: the params behind
    the args address, at launch time (and once more after a pause, to catch another thread's writes)."""

    def __init__(self, monkeypatch, delay: float = 0.0) -> None:
        from cuda.bindings import driver as cu

        self.delay, self.launches = delay, []
        self.function, self.device_index, self.name, self.shared_bytes = object(), 0, "fake", 2048

        def launch(function, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
            assert function is self.function and smem == self.shared_bytes
            self.record(gx, bx, stream, None, args)
            return (cu.CUresult.CUDA_SUCCESS,)

        monkeypatch.setattr(driver.cu, "cuLaunchKernel", launch)
        monkeypatch.setattr(plan, "current_stream", lambda index: 77)

    def record(self, grid, threads, stream, config, args) -> None:
        import ctypes

        params = KernelParams.from_address(ctypes.c_void_p.from_address(args).value)
        first = (params.x, params.y)
        if self.delay:
            time.sleep(self.delay)
        self.launches.append((grid, threads, stream, config, first, (params.x, params.y), params.len))

    def cluster_config(self, grid, threads, cluster):  # the Kernel side of a cluster launch
        return SimpleNamespace(grid=grid, threads=threads, cluster=cluster)

    def launch_args(self, grid, threads, args, stream, config=None):
        self.record(grid, threads, stream, config, args)


def test_launch_plan_sets_every_pointer_and_launches_through_its_args(monkeypatch) -> None:
    params = KernelParams()
    params.len = 123
    kernel = _FakeDriver(monkeypatch)
    lp = plan.LaunchPlan(kernel, 5, 64, 1, params)
    lp.launch(x=11, a=22, y=33, state=44)
    assert kernel.launches == [(5, 64, 77, None, (11, 33), (11, 33), 123)]
    assert (params.a, params.state, params.dy, params.dbc) == (22, 44, None, None)
    lp.launch(x=1, y=2)  # pointers not given are cleared, not left from the previous call
    assert params.a is None and params.state is None
    clustered = plan.LaunchPlan(kernel, 8, 32, 2, KernelParams())
    clustered.launch(x=1)
    assert kernel.launches[-1][3].cluster == 2  # the config is built once, with the plan


def test_launch_plan_is_thread_safe(monkeypatch) -> None:
    kernel = _FakeDriver(monkeypatch, delay=1e-4)
    lp = plan.LaunchPlan(kernel, 1, 32, 1, KernelParams())

    def run(tag: int) -> None:
        for i in range(50):
            lp.launch(x=tag * 1000 + i + 1, y=tag * 1000 + i + 1)

    threads = [threading.Thread(target=run, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kernel.launches) == 100
    assert all(before == after and before[0] == before[1] for *_, before, after, _len in kernel.launches)


def test_launch_plan_errors_go_through_the_kernels_recovery(monkeypatch) -> None:
    from cuda.bindings import driver as cu

    results = [cu.CUresult.CUDA_ERROR_INVALID_CONTEXT, cu.CUresult.CUDA_SUCCESS]
    bound = []
    monkeypatch.setattr(driver.cu, "cuLaunchKernel", lambda *args: (results.pop(0),))
    monkeypatch.setattr(driver, "ensure_context", lambda device: bound.append(device.index))
    monkeypatch.setattr(plan, "current_stream", lambda index: 0)
    kernel = object.__new__(driver.Kernel)
    kernel.name, kernel.device_index, kernel.function, kernel.shared_bytes = "swr_fwd_vec", 0, object(), 0
    plan.LaunchPlan(kernel, 1, 32, 1, KernelParams()).launch(x=1)
    assert bound == [0] and results == []  # the context was bound and the launch repeated
    monkeypatch.setattr(driver.cu, "cuLaunchKernel", lambda *args: (cu.CUresult.CUDA_ERROR_INVALID_VALUE,))
    with pytest.raises(driver.CudaError, match="launch of swr_fwd_vec failed"):
        plan.LaunchPlan(kernel, 1, 32, 1, KernelParams()).launch(x=1)


def test_kernel_launch_args_reuses_a_cluster_config(monkeypatch) -> None:
    from cuda.bindings import driver as cu

    seen = []

    def fake_ex(config, function, args, extra):
        seen.append((config.attrs[0].value.clusterDim.x, config.gridDimX, int(config.hStream), args))
        return (cu.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver.cu, "cuLaunchKernelEx", fake_ex)
    kernel = object.__new__(driver.Kernel)
    kernel.name, kernel.device_index, kernel.function, kernel.shared_bytes = "k", 0, object(), 0
    config = kernel.cluster_config(8, 64, 4)
    kernel.launch_args(8, 64, 1234, 5, config)
    kernel.launch_args(8, 64, 1234, 6, config)
    assert seen == [(4, 8, 5, 1234), (4, 8, 6, 1234)]


# --- the public fast paths, with fakes for CUDA --------------------------------------------------------


class _FakePlan:
    def __init__(self, program, *geometry) -> None:
        self.program, self.geometry, self.runs = program, geometry, 0

    def run(self, *tensors):
        self.runs += 1
        return ("ran", self)


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """CPU tensors pass for CUDA ones on sm_90a; the launchers build _FakePlans; the tuned store reads an empty
    temporary cache folder; each test starts with empty plan caches."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "cpu"))
    monkeypatch.setattr(Program, "arch_for", lambda self, device: "sm_90a")
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path))
    built: list[_FakePlan] = []
    resolved: list[tuple] = []
    real_resolve = fastpath.resolve

    def resolve(program, device, shape, direction=None):  # the real one (store lookups included), recorded
        resolved.append((program, tuple(shape), direction))
        return real_resolve(program, device, shape, direction)

    def fake_plan(program, *tensors, **kwargs):
        built.append(_FakePlan(program, *(t.shape if isinstance(t, torch.Tensor) else t for t in tensors)))
        return built[-1]

    monkeypatch.setattr(fastpath, "resolve", resolve)
    monkeypatch.setattr(launch, "forward_plan", fake_plan)
    monkeypatch.setattr(fused_launch, "forward_plan", fake_plan)
    for cache in (swr_op._PLANS, fused_op._PLANS):
        monkeypatch.setattr(cache, "_cache", plan.PlanCache(cache._cache.maxsize))
    checks = []
    real_check = swr_op._check_tensors
    monkeypatch.setattr(swr_op, "_check_tensors", lambda a, x: (checks.append(1), real_check(a, x)))
    store.clear_memo()
    yield SimpleNamespace(built=built, resolved=resolved, checks=checks)
    store.clear_memo()


def _warm(fn, *args, **kwargs):
    """Two calls; the second's result (a hit when the first one's plan was cached)."""
    fn(*args, **kwargs)
    return fn(*args, **kwargs)


def test_swr_second_call_skips_checks_and_planning(fake_cuda) -> None:
    a, x = _inputs()
    tag, first = _warm(swrgen.swr, a, x)
    assert tag == "ran"
    built, checks = len(fake_cuda.built), len(fake_cuda.checks)
    for _ in range(3):
        assert swrgen.swr(a, x) == ("ran", first)
    assert len(fake_cuda.built) == built and len(fake_cuda.checks) == checks  # hits: no checks, no planning
    assert first.runs == 5  # the first call's plan served every call


def test_swr_new_geometry_or_arguments_get_their_own_plan(fake_cuda) -> None:
    a, x = _inputs(B=2, H=3)
    _, base = _warm(swrgen.swr, a, x)
    permuted = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert _warm(swrgen.swr, a, permuted)[1] is not base
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape)
    assert _warm(swrgen.swr, a, shifted)[1] is not base
    assert _warm(swrgen.swr, a.half(), x.half())[1] is not base
    assert _warm(swrgen.swr, a, x, out_dtype=torch.bfloat16)[1] is not base
    k3 = _warm(swrgen.swr, a, x, window_blocks=3)[1]
    assert k3 is not base and k3.program.spec.recurrence.window_blocks == 3
    assert swrgen.swr(a, x)[1] is base


def test_swr_validation_still_runs_for_values_that_hash_alike(fake_cuda) -> None:
    a, x = _inputs()
    _warm(swrgen.swr, a, x, window_blocks=1)
    with pytest.raises(Exception, match="window_blocks"):
        swrgen.swr(a, x, window_blocks=True)  # == 1 and hashes alike, but is no integer
    with pytest.raises(TypeError, match="float64"):
        swrgen.swr(a.double(), x.double())


def test_swr_grad_and_compile_take_the_custom_op(fake_cuda, monkeypatch) -> None:
    a, x = _inputs()
    _warm(swrgen.swr, a, x)
    calls = []
    monkeypatch.setattr(swr_op, "_swr_fwd", lambda *args: calls.append(args) or "custom op")
    assert swrgen.swr(a, x.clone().requires_grad_()) == "custom op"
    with torch.no_grad():
        assert swrgen.swr(a, x.clone().requires_grad_())[0] == "ran"

    def untouched(key):
        raise AssertionError("a plan cache was read while compiling")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(swr_op._PLANS._cache, "get", untouched)
    assert swrgen.swr(a, x) == "custom op"
    assert swrgen.load(default_spec())(a, x) == "custom op"
    assert len(calls) == 3


def test_is_compiling_is_checked_first(fake_cuda, monkeypatch) -> None:
    a, x = _inputs()
    assert fastpath.direct_ok(a, x)

    def unreachable():
        raise AssertionError("direct_ok read global state past is_compiling()")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "is_grad_enabled", unreachable)
    assert not fastpath.direct_ok(a, x)


def test_plans_are_dropped_when_the_tuned_store_changes(fake_cuda) -> None:
    a, x = _inputs()
    _, first = _warm(swrgen.swr, a, x)
    assert swrgen.swr(a, x)[1] is first
    store.clear_memo()  # what store.save() does after writing
    _, second = swrgen.swr(a, x)
    assert second is not first
    assert _warm(swrgen.swr, a, x)[1] is not first
    program = fake_cuda.built[-1].program
    assert program.spec.target.warps_per_cta != 8
    store.save(program.spec, "sm_90a", tuple(x.shape), {"target": {"warps_per_cta": 8}})
    tuned = swrgen.swr(a, x)[1].program  # the next call: the tuned program
    assert tuned is not program and tuned.spec.target.warps_per_cta == 8
    assert _warm(swrgen.swr, a, x)[1].program is tuned


def test_resolve_memoizes_without_hashing_specs(fake_cuda, monkeypatch) -> None:
    program = swrgen.load(default_spec()).program
    shape, device = (1, 2, 16, 32), torch.device("cuda", 0)
    assert fastpath.resolve(program, device, shape) is program  # nothing stored
    store.save(program.spec, "sm_90a", shape, {"target": {"tiles_per_warp": 3}})
    tuned = fastpath.resolve(program, device, shape)
    assert tuned is not program and tuned.spec.target.tiles_per_warp == 3

    def digest(self):
        raise AssertionError("a spec was hashed on a memoized resolve")

    monkeypatch.setattr(Spec, "digest", digest)
    assert fastpath.resolve(program, device, shape) is tuned
    generated = Program(program.spec, source=program.source)  # a generated/ folder's program: never swapped
    assert fastpath.resolve(generated, device, shape) is generated


def test_plans_made_inside_store_disabled_are_not_kept(fake_cuda) -> None:
    a, x = _inputs()
    with store.disabled():
        n = len(fake_cuda.built)
        swrgen.swr(a, x)
        swrgen.swr(a, x)
        assert len(fake_cuda.built) == n + 2  # nothing cached: the tuner times what it builds
    _, plan_ = _warm(swrgen.swr, a, x)
    with store.disabled():
        assert swrgen.swr(a, x)[1] is not plan_  # lookups answer None in here: no tuned plan served


def test_swr_op_fast_path_checks_against_its_own_spec(fake_cuda) -> None:
    a, x = _inputs()
    op = swrgen.load(default_spec())
    _, p = _warm(op, a, x)
    assert op(a, x)[1] is p
    with pytest.raises(TypeError, match="dtype"):
        op(a.float(), x.float())  # the spec takes bf16; a float32 plan of swr() must not serve it
    _warm(swrgen.swr, a.float(), x.float())
    with pytest.raises(TypeError, match="dtype"):
        op(a.float(), x.float())


def test_phalanx_fast_path(fake_cuda) -> None:
    layout = GatingLayout(4, 2, 16)
    P = torch.randn(2, 8, layout.width).bfloat16()
    _, first = _warm(swrgen.phalanx_gating, P, heads=4, kv_heads=2)
    n = len(fake_cuda.built)
    assert swrgen.phalanx_gating(P, heads=4, kv_heads=2)[1] is first
    assert len(fake_cuda.built) == n
    assert fake_cuda.resolved[-1][1] == (2, 4, 16, 8)  # the store's shape of the fused kernels: (B, H, 16, L)
    assert _warm(swrgen.phalanx_gating, P, heads=4, kv_heads=2, decay_max=0.5)[1] is not first
    with pytest.raises(ValueError, match="kv_heads"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2.0)  # == 2, but no int
    store.clear_memo()
    assert swrgen.phalanx_gating(P, heads=4, kv_heads=2)[1] is not first
