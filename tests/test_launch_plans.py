"""The runtime objects and the launch plans, without a GPU: kernel sets get a fake device (kernels that record
what the driver would read), and CPU tensors pass for CUDA ones (``is_cuda`` patched). What is tested is the
runtime's logic: one KernelSet per spec and source owns its plans and tuned variants, validated calls skip the
checks, a tuned-store change drops what embeds a tuned choice, the tuner's plans are not kept, the ways into
the op (direct, autograd, custom op), and LaunchPlan itself (pointers, grid, threads)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch

import swrgen
from swrgen.ops.phalanx import GatingLayout
from swrgen.ops.phalanx import launch as fused_launch
from swrgen.ops.swr import launch
from swrgen.ops.swr import op as swr_op
from swrgen.ops.swr.state import SwrState
from swrgen.runtime import driver, kernels, plan
from swrgen.runtime.kernels import KernelSet
from swrgen.runtime.params import KernelParams
from swrgen.runtime.plan import PlanCache
from swrgen.runtime.program import Program
from swrgen.runtime.registry import REGISTRY
from swrgen.spec import default_spec
from swrgen.tune import store


def _inputs(B=1, H=2, DH=16, L=32, dtype=torch.bfloat16, per_channel=False):
    a = torch.rand((B, H, DH, L) if per_channel else (B, H, L)).to(dtype)
    return a, torch.randn(B, H, DH, L).to(dtype)


# --- PlanCache and LaunchPlan ----------------------------------------------------------------------------


def test_plan_cache_is_bounded_oldest_first() -> None:
    cache = PlanCache(3)
    for i in range(5):
        assert cache.put(i, f"plan{i}") == f"plan{i}"
    assert len(cache) == 3 and cache.get(0) is None and cache.get(1) is None
    assert [cache.get(i) for i in (2, 3, 4)] == ["plan2", "plan3", "plan4"]
    cache.put(3, "again")  # replacing a key evicts nothing
    assert len(cache) == 3 and cache.get(2) == "plan2" and cache.get(3) == "again"
    assert cache.values() == ["plan2", "again", "plan4"]
    with pytest.raises(ValueError, match="maxsize"):
        PlanCache(0)


def test_plan_cache_concurrent_puts_stay_bounded() -> None:
    cache = PlanCache(16)

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


_FAKES: dict[int, _FakeKernel] = {}


def fake_driver(monkeypatch) -> None:
    """cuLaunchKernel hands each launch to the fake kernel whose function it names; streams are 77."""
    from cuda.bindings import driver as cu

    def launch(function, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        kernel = _FAKES[id(function)]
        assert smem == kernel.shared_bytes
        kernel.record(gx, bx, stream, None, args)
        return (cu.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver.cu, "cuLaunchKernel", launch)
    monkeypatch.setattr(plan, "current_stream", lambda index: 77)


class _FakeKernel:
    """A kernel whose launches record what the driver would read: the params behind the args address at
    launch time (and once more after a pause, to catch another thread's writes)."""

    def __init__(self, monkeypatch, name: str = "fake", delay: float = 0.0) -> None:
        self.delay, self.launches = delay, []
        self.function, self.device_index, self.name, self.shared_bytes = object(), 0, name, 2048
        _FAKES[id(self.function)] = self

        fake_driver(monkeypatch)

    def record(self, grid, threads, stream, config, args) -> None:
        params = KernelParams.from_address(ctypes.c_void_p.from_address(args).value)
        first = (params.x, params.y)
        if self.delay:
            time.sleep(self.delay)
        self.launches.append(SimpleNamespace(grid=grid, threads=threads, stream=stream, config=config, first=first,
                                             after=(params.x, params.y), work=params.work,
                                             state=params.state, state_out=params.state_out,
                                             seq_start=params.seq_start, a=params.a, dy=params.dy,
                                             dx=params.dx, da=params.da))  # fmt: skip

    def max_active_ctas_per_sm(self, threads: int) -> int:
        return 2

    def cluster_config(self, grid, threads, cluster):  # the Kernel side of a cluster launch
        return SimpleNamespace(grid=grid, threads=threads, cluster=cluster, gridDimX=grid)

    def launch_args(self, grid, threads, args, stream, config=None):
        self.record(grid, threads, stream, config, args)


def test_launch_plan_sets_every_pointer_and_launches_through_its_args(monkeypatch) -> None:
    params = KernelParams()
    params.work = 123
    kernel = _FakeKernel(monkeypatch)
    lp = plan.LaunchPlan(kernel, 5, 64, 1, params)
    lp.launch(x=11, a=22, y=33, state=44)
    (first,) = kernel.launches
    assert (first.grid, first.threads, first.stream, first.first, first.work) == (5, 64, 77, (11, 33), 123)
    assert (params.a, params.state, params.dy, params.dbc) == (22, 44, None, None)
    lp.launch(x=1, y=2)  # pointers not given are cleared, not left from the previous call
    assert params.a is None and params.state is None
    clustered = plan.LaunchPlan(kernel, 8, 32, 2, KernelParams())
    clustered.launch(x=1)
    assert kernel.launches[-1].config.cluster == 2  # the config is built once, with the plan


def test_launch_fields_clears_other_pointers_and_sizes_the_grid_from_the_work(monkeypatch) -> None:
    params = KernelParams()
    kernel = _FakeKernel(monkeypatch)
    lp = plan.LaunchPlan(kernel, 1, 4 * 32, 2, params, grid_cap=6)  # 4 warps a CTA, clusters of 2, one wave of 6
    lp.launch(x=5, state=9)
    lp.launch_fields({"x": 1, "seq_start": 2, "num_seqs": 3}, work=13)  # 13 warps: 4 CTAs, whole clusters
    last = kernel.launches[-1]
    assert last.grid == 4 and last.work == 13 and last.state is None and last.seq_start == 2
    lp.launch_fields({"x": 1}, work=100)  # 25 CTAs, capped at the wave
    assert kernel.launches[-1].grid == 6 and kernel.launches[-1].config.gridDimX == 6
    assert plan.grid_for(0, 4, 1, None) == 0
    n = len(kernel.launches)
    lp.launch_fields({"x": 1}, work=0)  # no work: no launch
    assert len(kernel.launches) == n


def test_launch_plan_is_thread_safe(monkeypatch) -> None:
    kernel = _FakeKernel(monkeypatch, delay=1e-4)
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
    assert all(r.first == r.after and r.first[0] == r.first[1] for r in kernel.launches)


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


# --- kernel sets, the registry and the ops, on a fake device ---------------------------------------------


class _FakeDevice:
    """What KernelSet.on returns on a fake device: an arch, fake kernels by name, and the plan cache."""

    def __init__(self, program: Program, monkeypatch) -> None:
        self.index, self.arch, self.card, self.multiprocessors = -1, "sm_90a", None, 132
        self.kernels = {name: _FakeKernel(monkeypatch, name) for name in program.kernel_names}
        self.plans = PlanCache(kernels.PLANS_PER_DEVICE)


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """CPU tensors pass for CUDA ones; kernel sets load onto fake devices; the tuned store reads an empty
    temporary cache folder; plans made and tuned lookups are recorded; the registry's call memo starts empty."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "cpu"))
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path))
    made, lookups, checks = [], [], []

    def on(self, index):
        dev = self._devices.get(index)
        if dev is None:
            dev = self._devices[index] = _FakeDevice(self.program, monkeypatch)
        return dev

    real_make, real_for_shape, real_check = launch.make_plan, KernelSet.for_shape, swr_op.check_tensors

    def make_plan(ks, dev, name, params):
        made.append((ks, name))
        return real_make(ks, dev, name, params)

    def for_shape(self, index, shape, direction):
        lookups.append((self, tuple(shape), direction))
        return real_for_shape(self, index, shape, direction)

    def forget_devices() -> None:  # kernel sets outlive a test (the defaults): no fake device may leak
        for ks in REGISTRY.live():
            ks._devices.clear()
            for variant in ks._variants.values():
                variant._devices.clear()

    fake_driver(monkeypatch)
    monkeypatch.setattr(KernelSet, "on", on)
    monkeypatch.setattr(KernelSet, "for_shape", for_shape)
    monkeypatch.setattr(launch, "make_plan", make_plan)
    monkeypatch.setattr(fused_launch, "make_plan", make_plan)
    monkeypatch.setattr(swr_op, "check_tensors", lambda a, x: (checks.append(1), real_check(a, x)))
    forget_devices()
    store.clear_memo()
    yield SimpleNamespace(made=made, lookups=lookups, checks=checks)
    store.clear_memo()
    forget_devices()


def _calls(fn, *args, n=3, **kwargs):
    return [fn(*args, **kwargs) for _ in range(n)]


def test_second_call_skips_checks_lookups_and_planning(fake_cuda) -> None:
    a, x = _inputs()
    swrgen.swr(a, x)
    made, checks, lookups = len(fake_cuda.made), len(fake_cuda.checks), len(fake_cuda.lookups)
    assert made == 1 and checks == 1 and lookups == 1
    ys = _calls(swrgen.swr, a, x)
    assert all(y.shape == x.shape and y.dtype == torch.float32 for y in ys)
    assert (len(fake_cuda.made), len(fake_cuda.checks), len(fake_cuda.lookups)) == (made, checks, lookups)
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    launches = ks.on(-1).kernels["swr_fwd_vec"].launches
    assert len(launches) == 4  # every call launched the one plan


def test_new_geometry_or_arguments_get_their_own_plan(fake_cuda) -> None:
    a, x = _inputs(B=2, H=3)
    swrgen.swr(a, x)
    n = len(fake_cuda.made)
    permuted = x.transpose(0, 1).contiguous().transpose(0, 1)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape)
    shifted.copy_(x)
    for args, kw in [((a, permuted), {}), ((a, shifted), {}), ((a.half(), x.half()), {}),
                     ((a, x), {"out_dtype": torch.bfloat16}), ((a, x), {"window_blocks": 3})]:  # fmt: skip
        _calls(swrgen.swr, *args, **kw)
        assert len(fake_cuda.made) == n + 1, (args[1].stride(), kw)  # one plan, then hits
        n += 1
    assert fake_cuda.made[-1][0].spec.recurrence.window_blocks == 3
    assert fake_cuda.made[-3][1] == "swr_fwd_vec" and fake_cuda.made[-4][1] == "swr_fwd_scalar"  # the unaligned copy
    swrgen.swr(a, x)
    assert len(fake_cuda.made) == n  # the first geometry still hits


def test_validation_still_runs_for_values_that_hash_alike(fake_cuda) -> None:
    a, x = _inputs()
    _calls(swrgen.swr, a, x, window_blocks=1)
    with pytest.raises(ValueError, match="window_blocks must be an int"):
        swrgen.swr(a, x, window_blocks=True)  # == 1 and hashes alike, but is no integer
    with pytest.raises(ValueError, match="window_blocks must be an int"):
        swrgen.swr(a, x, window_blocks=1.0)
    with pytest.raises(TypeError, match="float64"):
        swrgen.swr(a.double(), x.double())
    with pytest.raises(TypeError, match="out_dtype must be a floating"):
        swrgen.swr(a, x, out_dtype=torch.int32)


def test_grad_goes_through_autograd_and_compile_through_the_custom_op(fake_cuda, monkeypatch) -> None:
    a, x = _inputs()
    swrgen.swr(a, x)
    applied, dense, custom = [], [], []
    monkeypatch.setattr(swr_op._SwrFunction, "apply", lambda *args: applied.append(args) or (args[1], None, None))
    monkeypatch.setattr(swr_op._SwrTrainCallFunction, "apply", lambda *args: dense.append(args) or args[1])
    monkeypatch.setattr(swr_op, "_swr_fwd", lambda *args: custom.append(args) or (args[1], None, None))
    xg = x.clone().requires_grad_()
    assert swrgen.swr(a, xg) is xg and len(dense) == 1 and isinstance(dense[0][2], swr_op.TrainCall)
    assert swrgen.swr(a, xg) is xg and len(dense) == 2 and dense[1][2] is dense[0][2]  # the remembered call
    assert swrgen.swr(a, xg, cu_seqlens=[0, 32]) is xg and len(dense) == 3  # packed, host ints: a TrainCall too
    assert dense[2][2] is not dense[0][2] and dense[2][2].forward.seqs.starts == (0, 32)
    assert swrgen.swr(a, xg, cu_seqlens=torch.tensor([0, 32])) is xg and len(applied) == 1  # a tensor: checked
    with torch.no_grad():
        assert swrgen.swr(a, xg).shape == x.shape and len(applied) == 1 and len(dense) == 3  # the direct launch
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(REGISTRY.calls, "get", lambda key: pytest.fail("the call memo was read while compiling"))
    assert swrgen.swr(a, x) is x and swrgen.load(default_spec())(a, x) is x
    assert len(custom) == 2 and isinstance(custom[0][7], str) and len(custom[0][7]) == 32  # the kernel set's key


def _bwd_launches(ks) -> list:
    return [r for name, k in ks.on(-1).kernels.items() if name.startswith("swr_bwd") for r in k.launches]


@pytest.mark.parametrize(("head_dim", "per_channel"), [(16, False), (32, False), (16, True)])
def test_repeated_training_call_skips_checks_and_planning_both_ways(fake_cuda, head_dim, per_channel) -> None:
    a, x = _inputs(DH=head_dim, per_channel=per_channel)
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape)  # float32: the output's dtype, contiguous
    ks = swr_op.default_kernels(head_dim, per_channel, x.dtype, a.dtype, 2, 16, torch.float32)
    y = swrgen.swr(ag, xg)
    assert type(y.grad_fn).__name__ == "_SwrTrainCallFunctionBackward"
    da, dx = torch.autograd.grad(y, (ag, xg), dy)
    assert (da.shape, da.dtype, dx.shape, dx.dtype) == (a.shape, a.dtype, x.shape, x.dtype)
    assert [name for _, name in fake_cuda.made] == ["swr_fwd_vec", "swr_bwd_vec"] and len(fake_cuda.checks) == 1
    for _ in range(3):  # hits: no check, tuned lookup or plan; the backward launches the cached plan
        da, dx = torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), dy)
        last = _bwd_launches(ks)[-1]
        assert (last.dy, last.dx, last.first[0]) == (dy.data_ptr(), dx.data_ptr(), xg.data_ptr())
        assert da.shape == a.shape and (last.da == da.data_ptr()) == (head_dim == 16 or per_channel)
    assert len(fake_cuda.made) == 2 and len(fake_cuda.checks) == 1 and len(fake_cuda.lookups) == 2
    assert len(_bwd_launches(ks)) == 4
    # An upstream gradient in another dtype is cast (same plan); restrided, it takes the general backward.
    torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), dy.bfloat16())
    assert len(fake_cuda.made) == 2 and len(_bwd_launches(ks)) == 5
    restrided = dy.transpose(0, 1).contiguous().transpose(0, 1) if x.shape[0] > 1 else dy[..., ::2].repeat_interleave(
        2, dim=-1).transpose(1, 2).contiguous().transpose(1, 2)  # fmt: skip
    assert not restrided.is_contiguous()
    torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), restrided)
    assert [name for _, name in fake_cuda.made[2:]] == ["swr_bwd_vec"] and _bwd_launches(ks)[-1].dy == (
        restrided.data_ptr())  # fmt: skip
    with torch.no_grad():  # an inference call of the same geometry is remembered apart (a ForwardCall)
        swrgen.swr(ag, xg)
    assert len(fake_cuda.checks) == 2 and len(fake_cuda.made) == 3
    assert sorted(type(c).__name__ for c in REGISTRY.calls.values()) == ["ForwardCall", "TrainCall"]


def test_a_training_call_of_no_tokens_takes_the_general_function(fake_cuda) -> None:
    a, x = _inputs(L=0)
    ag = a.clone().requires_grad_()
    y = swrgen.swr(ag, x)
    assert y.shape == x.shape and type(y.grad_fn).__name__ == "_SwrFunctionBackward"
    assert len(REGISTRY.calls) == 0


def test_rows_longer_than_32_bit_token_indices_are_refused(fake_cuda, monkeypatch) -> None:
    from swrgen import constants

    launch.check_row_length(constants.MAX_SEQUENCE_TOKENS)
    with pytest.raises(ValueError, match="32-bit"):
        launch.check_row_length(constants.MAX_SEQUENCE_TOKENS + 1)
    # A meta tensor passes for a CUDA one: the plan a call of that many tokens would need is refused.
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cpu", "meta")))
    n = constants.MAX_SEQUENCE_TOKENS + 1
    a = torch.empty(1, 1, n, device="meta", dtype=torch.bfloat16)
    x = torch.empty(1, 1, 16, n, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"a row of {n} tokens"):
        swrgen.swr(a, x)
    layout = GatingLayout(1, 1, 16)
    with pytest.raises(ValueError, match=f"a row of {n} tokens"):
        swrgen.phalanx_gating(torch.empty(1, n, layout.width, device="meta", dtype=torch.bfloat16), heads=1)


def test_is_compiling_is_checked_first(monkeypatch) -> None:
    a, x = _inputs()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert swr_op.fast_path(a, x) == "infer"

    def unreachable():
        raise AssertionError("fast_path read global state past is_compiling()")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "is_grad_enabled", unreachable)
    assert swr_op.fast_path(a, x) is None


def test_fast_path_names_the_call_to_reuse(monkeypatch) -> None:
    a, x = _inputs()
    assert swr_op.fast_path(a, x) is None  # CPU tensors: the checked path
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert swr_op.fast_path(a, x) == "infer"
    assert swr_op.fast_path(a, x.clone().requires_grad_()) == "train"
    with torch.no_grad():
        assert swr_op.fast_path(a.clone().requires_grad_(), x) == "infer"
    assert swr_op.fast_path(a, torch.nn.Parameter(x)) is None  # a subclass sees the op


def test_a_tuned_store_change_drops_what_embeds_a_tuned_choice(fake_cuda) -> None:
    a, x = _inputs()
    _calls(swrgen.swr, a, x)
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    assert len(REGISTRY.calls) == 1 and len(ks.on(-1).plans) == 1
    store.save(ks.spec, "sm_90a", tuple(x.shape), {"target": {"warps_per_cta": 8, "tiles_per_warp": 3}})
    assert len(REGISTRY.calls) == 0 and len(ks.on(-1).plans) == 0  # the store told the registry
    swrgen.swr(a, x)
    variant, name = fake_cuda.made[-1]
    assert variant is not ks and variant.pinned and variant.spec.target.warps_per_cta == 8
    assert variant is ks.variant({"tiles_per_warp": 3, "warps_per_cta": 8})  # memoized on its parent
    assert fake_cuda.lookups[-1] == (ks, tuple(x.shape), "fwd")
    launched = variant.on(-1).kernels[name].launches
    assert launched and launched[-1].threads == 8 * 32
    n = len(fake_cuda.made)
    _calls(swrgen.swr, a, x)
    assert len(fake_cuda.made) == n  # hits again


def test_pinned_kernel_sets_never_swap_knobs(fake_cuda) -> None:
    spec = default_spec()
    generated = KernelSet(Program(spec, source=Program(spec).source))  # a build folder's program: pinned
    assert generated.pinned and generated.for_shape(-1, (1, 2, 16, 32), "fwd") is generated
    store.save(spec, "sm_90a", (1, 2, 16, 32), {"target": {"tiles_per_warp": 3}})
    templated = KernelSet(Program(spec))
    tuned = templated.for_shape(-1, (1, 2, 16, 32), "fwd")
    assert tuned is not templated and tuned.spec.target.tiles_per_warp == 3
    assert tuned.for_shape(-1, (1,), "fwd") is tuned


def test_plans_made_inside_store_disabled_are_not_kept(fake_cuda) -> None:
    a, x = _inputs()
    with store.disabled():
        n = len(fake_cuda.made)
        swrgen.swr(a, x)
        swrgen.swr(a, x)
        assert len(fake_cuda.made) == n + 2  # nothing kept: the tuner times what it builds
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    assert len(ks.on(-1).plans) == 0 and len(REGISTRY.calls) == 0
    _calls(swrgen.swr, a, x)
    assert len(fake_cuda.made) == n + 3


def test_op_fast_path_checks_against_its_own_spec(fake_cuda) -> None:
    a, x = _inputs()
    op = swrgen.load(default_spec())
    _calls(op, a, x)
    with pytest.raises(TypeError, match="dtype"):
        op(a.float(), x.float())  # the spec takes bf16; a float32 call of swr() must not serve it
    _calls(swrgen.swr, a.float(), x.float())
    with pytest.raises(TypeError, match="dtype"):
        op(a.float(), x.float())


def test_dropping_an_op_drops_its_kernel_set_and_plans(fake_cuda) -> None:
    spec = default_spec(window_blocks=5)
    op = swrgen.load(spec)
    a, x = _inputs()
    with torch.no_grad():
        _calls(op, a, x)
    ref = weakref.ref(op.kernels)
    key = op.key
    assert REGISTRY.get(key) is op.kernels
    REGISTRY.calls.clear()  # validated calls hold plans, not kernel sets; drop them for a clean count
    fake_cuda.made.clear()  # the fixture's records hold kernel sets too
    fake_cuda.lookups.clear()
    del op
    gc.collect()
    assert ref() is None
    with pytest.raises(KeyError, match="released"):
        REGISTRY.get(key)


def test_phalanx_fast_path(fake_cuda) -> None:
    layout = GatingLayout(4, 2, 16)
    P = torch.randn(2, 8, layout.width).bfloat16()
    swrgen.phalanx_gating(P, heads=4, kv_heads=2)
    n = len(fake_cuda.made)
    assert fake_cuda.lookups[-1][1:] == ((2, 4, 16, 8), "fwd")  # the store's shape of the fused kernels
    _calls(swrgen.phalanx_gating, P, heads=4, kv_heads=2)
    assert len(fake_cuda.made) == n
    _calls(swrgen.phalanx_gating, P, heads=4, kv_heads=2, decay_max=0.5)
    assert len(fake_cuda.made) == n + 1
    with pytest.raises(ValueError, match="kv_heads"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2.0)  # == 2, but no int
    store.clear_memo()
    swrgen.phalanx_gating(P, heads=4, kv_heads=2)
    assert len(fake_cuda.made) == n + 2


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_repeated_fused_training_call_skips_checks_and_planning_both_ways(fake_cuda, kv_heads) -> None:
    layout = GatingLayout(4, kv_heads, 16)
    P = torch.randn(2, 8, layout.width).bfloat16().requires_grad_()
    dZ = torch.randn(2, 8, layout.inner).bfloat16()
    Z = swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads)
    assert type(Z.grad_fn).__name__ == "_PhalanxTrainCallFunctionBackward"
    (dP,) = torch.autograd.grad(Z, P, dZ)
    assert dP.shape == P.shape and dP.dtype == P.dtype
    assert [name.split("_")[1] for _, name in fake_cuda.made] == ["fwd", "bwd"]
    lookups = len(fake_cuda.lookups)
    ks = swr_op.default_kernels(16, False, P.dtype, P.dtype, 2, 16, P.dtype, True)
    for _ in range(3):  # hits: no lookup or plan; the backward launches the cached plan
        (dP,) = torch.autograd.grad(swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads), P, dZ)
        launches = [r for name, k in ks.on(-1).kernels.items() if name.startswith("phalanx_bwd") for r in k.launches]
        assert (launches[-1].dy, launches[-1].dx, launches[-1].first[0]) == (dZ.data_ptr(), dP.data_ptr(),
                                                                             P.data_ptr())  # fmt: skip
    assert len(fake_cuda.made) == 2 and len(fake_cuda.lookups) == lookups and len(launches) == 4
    torch.autograd.grad(swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads), P, dZ.float())  # cast: same plan
    torch.autograd.grad(swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads), P, dZ.transpose(0, 1).contiguous()
                        .transpose(0, 1))  # restrided: the general backward, its own plan  # fmt: skip
    assert [name.split("_")[1] for _, name in fake_cuda.made] == ["fwd", "bwd", "bwd"]
    with torch.no_grad():  # inference of the same geometry: remembered apart
        swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads)
    assert sorted(type(c).__name__ for c in REGISTRY.calls.values()) == ["_GatingCall", "_GatingTrainCall"]


def test_packed_layout_is_checked_and_uploaded_once(fake_cuda, monkeypatch) -> None:
    """Offsets given as host ints are checked once: the same offsets again (the next layer, the next step, the
    backward) take the same checked layout and its device copies; other offsets, tensors and bad offsets are
    checked every time (an error is never remembered)."""
    checked, uploads = [], []
    real_check, real_upload = swr_op.check_cu_seqlens, launch.upload
    monkeypatch.setattr(swr_op, "check_cu_seqlens", lambda cu, total: (checked.append(1), real_check(cu, total))[1])
    monkeypatch.setattr(launch, "upload", lambda vals, device: (uploads.append(vals), real_upload(vals, device))[1])
    a, x = _inputs(L=100)
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape)
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    firsts, uploaded = [], []
    for cu in ([0, 40, 100], [0, 40, 100], (0, 40, 100)):  # a tuple of the same offsets is the same layout
        torch.autograd.grad(swrgen.swr(ag, xg, cu_seqlens=cu), (ag, xg), dy)
        firsts.append(ks.on(-1).kernels["swr_fwd_scalar"].launches[-1].seq_start)
        uploaded.append(len(uploads))
    assert len(checked) == 1 and len(REGISTRY.layouts) >= 1
    assert uploaded[0] >= 2 and uploaded[0] == uploaded[1] == uploaded[2]  # starts and chunk offsets, once
    assert firsts[0] == firsts[1] == firsts[2]  # one device copy of the starts serves every call
    bwd = ks.on(-1).kernels["swr_bwd_scalar"].launches
    assert bwd[-1].seq_start == firsts[0]
    swrgen.swr(a, x, cu_seqlens=[0, 7, 60, 100])  # other offsets: their own check
    swrgen.swr(a, x, cu_seqlens=torch.tensor([0, 40, 100]))  # a tensor: checked every time
    assert len(checked) == 3
    for _ in range(2):  # a bad layout raises every time
        with pytest.raises(ValueError, match="non-decreasing"):
            swrgen.swr(a, x, cu_seqlens=[0, 60, 40, 100])
    assert len(checked) == 5
    n = len(REGISTRY.layouts)
    swrgen.swr(a, x, cu_seqlens=[0, True, 100])  # a bool among the offsets: checked, not remembered
    assert len(checked) == 6 and len(REGISTRY.layouts) == n
    layout = GatingLayout(4, 2, 16)  # the fused op shares the memo
    P = torch.randn(1, 100, layout.width).bfloat16()
    for _ in range(3):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2, cu_seqlens=[0, 33, 100])
    assert len(checked) == 7
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # tracing: the memo is not read
    monkeypatch.setattr(REGISTRY.layouts, "get", lambda key: pytest.fail("the layout memo was read while compiling"))
    assert swr_op.packed_sequences([0, 40, 100], (1, 2, 16, 100), 100, x.device).starts == (0, 40, 100)
    assert len(checked) == 8


def test_repeated_packed_calls_are_remembered_with_their_layout(fake_cuda, monkeypatch) -> None:
    """A packed call with offsets given as host ints is remembered like a dense one (inference, and training
    both ways): a repeat skips every check, lookup and plan and launches the layout's own plans, whose
    fields are those of the checked path; other offsets, another stream or a tensor take their own call."""
    a, x = _inputs(L=100)
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape)
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    fwd, bwd = (ks.on(-1).kernels[f"swr_{d}_scalar"].launches for d in ("fwd", "bwd"))
    cu = [0, 7, 60, 100]  # 7 is no multiple of 8: the element-wise kernels
    torch.autograd.grad(swrgen.swr(ag, xg, cu_seqlens=torch.tensor(cu)), (ag, xg), dy)  # a tensor: checked path
    checked = (fwd[-1], bwd[-1])
    counts = (len(fake_cuda.made), len(fake_cuda.checks), len(fake_cuda.lookups))
    for _ in range(3):
        y = swrgen.swr(ag, xg, cu_seqlens=cu)
        assert type(y.grad_fn).__name__ == "_SwrTrainCallFunctionBackward"
        da, dx = torch.autograd.grad(y, (ag, xg), dy)
        assert (bwd[-1].dx, bwd[-1].da) == (dx.data_ptr(), da.data_ptr())
        with torch.no_grad():
            swrgen.swr(a, x, cu_seqlens=tuple(cu))  # a tuple of the same offsets: the same layout
    assert (len(fake_cuda.made), len(fake_cuda.checks)) == (counts[0], counts[1] + 2)  # the first of each kind
    assert len(fake_cuda.lookups) == counts[2]  # the plans were the tensor call's
    for new, old in ((fwd[-1], checked[0]), (bwd[-1], checked[1])):
        assert (new.grid, new.work) == (old.grid, old.work) == (old.grid, 2 * 3)  # 2 rows x 3 one-chunk sequences
        assert new.seq_start and new.seq_start != old.seq_start  # the remembered layout's own device copy
    assert len({launch.seq_start for launch in fwd[-6:]}) == 1
    kinds = sorted(type(c).__name__ for c in REGISTRY.calls.values())
    assert kinds == ["ForwardCall", "TrainCall"]
    REGISTRY.layouts.clear()  # the remembered call keeps the layout (and its copies) its plans point at
    held = next(c for c in REGISTRY.calls.values() if type(c).__name__ == "ForwardCall").seqs
    assert held.device_starts(x.device).data_ptr() == fwd[-1].seq_start
    swrgen.swr(a, x, cu_seqlens=[0, 40, 100])  # other offsets: their own call
    monkeypatch.setattr(launch, "current_stream", lambda index: 5)  # another stream: its own call and copies
    monkeypatch.setattr(launch, "on_stream", lambda device: (device, 5))
    swrgen.swr(a, x, cu_seqlens=cu)
    assert len(REGISTRY.calls) == 4 and fwd[-1].seq_start not in {fwd[-3].seq_start, fwd[-4].seq_start}
    layout = GatingLayout(4, 2, 16)  # the fused op: the same
    P = torch.randn(1, 100, layout.width).bfloat16()
    Pg = P.clone().requires_grad_()
    n = len(fake_cuda.made)
    for _ in range(3):
        Z = swrgen.phalanx_gating(Pg, heads=4, kv_heads=2, cu_seqlens=[0, 33, 100])
        assert type(Z.grad_fn).__name__ == "_PhalanxTrainCallFunctionBackward"
        torch.autograd.grad(Z, Pg, torch.randn_like(Z))
    assert len(fake_cuda.made) == n + 2  # one forward and one backward plan
    fks = swr_op.default_kernels(16, False, P.dtype, P.dtype, 2, 16, P.dtype, True)
    assert {r.work for name, k in fks.on(-1).kernels.items() for r in k.launches} == {4 * 2}  # 4 heads x 2 sequences


def test_packed_layout_device_copies_are_per_stream(monkeypatch) -> None:
    """A remembered layout's device copies are read only on the stream that made them (dropped, their memory
    goes back in that stream's order): another stream gets its own copy."""
    stream, uploads = [5], []
    monkeypatch.setattr(launch, "current_stream", lambda index: stream[0])
    monkeypatch.setattr(launch, "upload", lambda vals, device: (uploads.append(vals), torch.tensor(vals))[1])
    seqs, cuda = launch.Sequences([0, 40, 100]), torch.device("cuda", 0)
    first = seqs.device_starts(cuda)
    assert seqs.device_starts(cuda) is first and len(uploads) == 1
    seqs.chunk_offsets(cuda, 16, 4, (0, 0))
    seqs.chunk_offsets(cuda, 16, 4, (0, 0))
    assert len(uploads) == 2
    stream[0] = 6
    assert seqs.device_starts(cuda) is not first and len(uploads) == 3
    seqs.chunk_offsets(cuda, 16, 4, (0, 0))
    assert len(uploads) == 4


def test_packed_chunks_are_cut_with_the_tuned_variants_tiles_per_warp(fake_cuda, monkeypatch) -> None:
    """A packed call cuts each sequence into chunks of the tiles_per_warp its kernel walks: a tuned variant's,
    not the spec's (chunks of the spec's 64 tiles walked 3 at a time would leave most tiles unwritten)."""
    seen = []
    real = plan.LaunchPlan._launch

    def spy(self, grid, stream):
        seen.append((self.params.tiles_per_warp, self.params.chunks, self.params.work, self.params.rows))
        real(self, grid, stream)

    monkeypatch.setattr(plan.LaunchPlan, "_launch", spy)
    cu = [0, 100, 101, 400]  # 7, 1 and 19 tiles of 16: 3 + 1 + 7 chunks of 3 tiles
    a, x = _inputs(L=400)
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    assert ks.spec.target.tiles_per_warp != 3
    store.save(ks.spec, "sm_90a", launch.tuning_shape(tuple(x.shape), launch.Sequences(cu)),
               {"target": {"tiles_per_warp": 3}})  # fmt: skip
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    y = swrgen.swr(ag, xg, cu_seqlens=cu)
    torch.autograd.grad(y, (ag, xg), torch.randn_like(y))
    layout = GatingLayout(2, 2, 16)
    P = torch.randn(1, 400, layout.width).bfloat16()
    fused = swr_op.default_kernels(16, False, P.dtype, P.dtype, 2, 16, P.dtype, True)
    store.save(fused.spec, "sm_90a", fused_launch.tuning_shape(P, layout, launch.Sequences(cu)),
               {"target": {"tiles_per_warp": 3}})  # fmt: skip
    Pg = P.clone().requires_grad_()
    Z = swrgen.phalanx_gating(Pg, heads=2, cu_seqlens=cu)
    torch.autograd.grad(Z, Pg, torch.randn_like(Z))
    assert len(seen) == 4  # swr fwd, bwd; fused fwd, bwd
    for tiles_per_warp, chunks, work, rows in seen:
        assert (tiles_per_warp, chunks, work) == (3, 11, rows * 11)


def test_packed_and_state_calls_reuse_their_plan_and_set_the_work(fake_cuda) -> None:
    a, x = _inputs(L=100)
    swrgen.swr(a, x, cu_seqlens=[0, 40, 100])
    n = len(fake_cuda.made)
    swrgen.swr(a, x, cu_seqlens=[0, 7, 60, 100])  # other sequences, same plan; their work is set per call
    assert len(fake_cuda.made) == n and fake_cuda.made[-1][1] == "swr_fwd_scalar"  # 7 is no multiple of 8
    ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    launches = ks.on(-1).kernels["swr_fwd_scalar"].launches
    assert launches[-1].seq_start is not None and launches[-1].work == 2 * 3  # 2 rows x 3 sequences of 1 chunk
    a, x = _inputs(L=96)  # rows of 16-byte multiples, and a phase (0) the host knows: the vector kernel
    state = swrgen.ops.swr.state.SwrState.zeros(1, 2, 16, 2)
    _y, new = swrgen.swr(a, x, initial_state=state, return_state=True)
    assert fake_cuda.made[-1][1] == "swr_fwd_state_vec" and new.positions() == [96]
    state.host_pos = None  # positions only on the device: the phases are unknown, so element-wise
    swrgen.swr(a, x, initial_state=state, return_state=True)
    assert fake_cuda.made[-1][1] == "swr_fwd_state_scalar"
    swrgen.swr(a, x, initial_state=state)  # a state in, none out: still the kernel that reads it
    assert fake_cuda.made[-1][1] == "swr_fwd_state_scalar"
    launch = ks.on(-1).kernels["swr_fwd_state_scalar"].launches[-1]
    assert launch.state and not launch.state_out


def test_state_backward_reads_no_phase_where_every_sequence_starts_at_a_tile(fake_cuda) -> None:
    a, x = _inputs(B=2, L=96)
    for positions, kernel in (([0, 32], "swr_bwd_state_aligned_vec"), ([16, 8], "swr_bwd_state_vec"),
                              ([3, 0], "swr_bwd_state_scalar")):  # fmt: skip
        state = SwrState(SwrState.zeros(2, 2, 16, 2).data, positions, 16)  # host positions: phases known
        ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
        y = swrgen.swr(ag, xg, initial_state=state)
        torch.autograd.grad(y, (ag, xg), torch.randn_like(y))
        assert fake_cuda.made[-1][1] == kernel, positions  # each case a plan of its own: made last
    P = torch.randn(2, 96, 8 + 3 * 8 * 16).bfloat16()  # 8 heads and kv-heads of 16 channels: aligned blocks
    for positions, kernel in (([0, 32], "phalanx_bwd_state_aligned_vec"), ([16, 8], "phalanx_bwd_state_vec")):
        state = SwrState(SwrState.zeros(2, 8, 16, 2).data, positions, 16)
        Pg = P.clone().requires_grad_()
        Z = swrgen.phalanx_gating(Pg, heads=8, initial_state=state)
        torch.autograd.grad(Z, Pg, torch.randn_like(Z))
        assert fake_cuda.made[-1][1] == kernel, positions
