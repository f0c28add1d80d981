"""GPU tests of the plan-cached launch paths (skip without CUDA): the inference and training fast paths of
``swrgen.swr``, ``SwrOp`` and ``swrgen.phalanx_gating`` give what the custom ops give, bit for bit; a call
with other strides, alignment or dtypes never runs a stale plan; a tuned-store change takes effect on the
next call; and threads can share plans."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

import swrgen
from swrgen.ops.phalanx import GatingLayout
from swrgen.ops.phalanx import launch as fused_launch
from swrgen.ops.phalanx.reference import phalanx_gating_reference
from swrgen.ops.swr import launch
from swrgen.ops.swr import op as swr_op
from swrgen.ops.swr.reference import swr_reference
from swrgen.runtime.registry import REGISTRY
from swrgen.spec import default_spec
from swrgen.tune import store
from tests.gpu_util import make_inputs, rel_err

pytestmark = pytest.mark.gpu


def _poison_allocator(nbytes: int) -> None:
    """Fill a freed block with NaN so the next allocation of that size likely reuses it: the fast path
    allocates its own output, and an element it failed to write then shows."""
    torch.full((nbytes // 4 + 64,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def _swr(a: torch.Tensor, x: torch.Tensor, **kwargs) -> torch.Tensor:
    _poison_allocator(x.numel() * 4)
    return swrgen.swr(a, x, **kwargs)


class _SeeTheOp(TorchFunctionMode):
    """A torch function mode that changes nothing: under it the public ops take the checked path through
    their custom ops (``swrgen::swr_fwd`` / ``swrgen::phalanx_fwd`` and their registered backwards)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _custom_op(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same call through the custom op."""
    with _SeeTheOp():
        return swrgen.swr(a, x)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _trained(fn, inputs: tuple[torch.Tensor, ...], dy: torch.Tensor, poison_bytes: int, **kwargs):
    """(out, grads) of ``fn(*leaves, **kwargs)`` on fresh leaves of ``inputs`` for upstream gradient dy, on the
    path a plain call takes (the allocator poisoned first)."""
    leaves = _leaves(*inputs)
    _poison_allocator(poison_bytes)
    out = fn(*leaves, **kwargs)
    return out, torch.autograd.grad(out, leaves, dy)


def _trained_by_the_op(fn, inputs: tuple[torch.Tensor, ...], dy: torch.Tensor, **kwargs):
    """The same through the custom ops."""
    leaves = _leaves(*inputs)
    with _SeeTheOp():
        out = fn(*leaves, **kwargs)
        return out, torch.autograd.grad(out, leaves, dy)


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose base is 2 bytes past a 16-byte boundary (same shape, contiguous)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return out.copy_(t)


def _restrided(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _reference(a: torch.Tensor, x: torch.Tensor, k: int = 2) -> torch.Tensor:
    return swr_reference(a.double(), x.double(), k, 16)


@pytest.mark.parametrize("length", [16, 17, 1000, 4096])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fast_path_equals_custom_op_bitwise(length, per_channel):
    a, x = make_inputs(2, 3, 16, length, per_channel=per_channel, seed=length)
    y_op = _custom_op(a, x)
    for _ in range(3):  # the first call plans, the later ones hit
        y = _swr(a, x)
        assert torch.equal(y, y_op)
    assert rel_err(y, _reference(a, x)) <= 2e-3
    op = swrgen.load(default_spec(gate_layout="per_channel" if per_channel else "per_head"))
    with torch.no_grad():
        assert torch.equal(op(a, x), y_op) and torch.equal(op(a, x), y_op)


def test_other_strides_alignment_and_dtypes_get_their_own_plan():
    a, x = make_inputs(3, 4, 16, 2048, seed=1)
    base = _swr(a, x)
    assert rel_err(base, _reference(a, x)) <= 2e-3
    permuted = x.transpose(0, 1).contiguous().transpose(0, 1)  # other batch/head strides
    assert torch.equal(_swr(a, permuted), base)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    unaligned = storage[1:].view(x.shape)  # scalar kernel: the vector one would fault or misread
    unaligned.copy_(x)
    assert not launch.aligned(unaligned, a)
    assert torch.equal(_swr(a, unaligned), base)
    assert torch.equal(_swr(a, x), base)  # and back
    a16, x16 = a.half(), x.half()
    assert rel_err(_swr(a16, x16), _reference(a16, x16)) <= 2e-3
    y_bf16 = _swr(a, x, out_dtype=torch.bfloat16)
    assert y_bf16.dtype == torch.bfloat16 and rel_err(y_bf16, _reference(a, x)) <= 8e-3
    y3 = _swr(a, x, window_blocks=3)
    assert rel_err(y3, _reference(a, x, k=3)) <= 2e-3
    short = x[..., :1000]  # same storage, other length (strides unchanged)
    assert rel_err(_swr(a[..., :1000], short), _reference(a[..., :1000], short)) <= 2e-3


def test_backward_plans_match_reference_on_repeated_and_restrided_calls():
    a, x = make_inputs(2, 3, 32, 1000, seed=4)  # head_dim 32: da summed over two channel groups
    a64, x64 = a.double().requires_grad_(), x.double().requires_grad_()
    dy = torch.randn(x.shape, device="cuda")
    want = torch.autograd.grad(swr_reference(a64, x64, 2, 16), (a64, x64), dy.double())
    for dy_ in (dy, dy, dy.transpose(0, 1).contiguous().transpose(0, 1)):
        ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
        got = torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), dy_)
        assert rel_err(got[0], want[0]) <= 5e-3 and rel_err(got[1], want[1]) <= 5e-3


@pytest.mark.parametrize(("head_dim", "per_channel", "out"), [(16, False, torch.float32), (32, False, torch.float32),
                                                              (16, True, torch.bfloat16)])  # fmt: skip
def test_training_calls_equal_the_custom_ops_bitwise(head_dim, per_channel, out):
    """Repeated training calls (a TrainCall's cached plans, or its general backward for other layouts of dy)
    give the custom ops' outputs and gradients bit for bit, and the float64 reference's within tolerance."""
    a, x = make_inputs(2, 3, head_dim, 1000, per_channel=per_channel, seed=head_dim + per_channel)
    dy = torch.randn(x.shape, device="cuda").to(out)
    a64, x64 = _leaves(a.double(), x.double())
    want = torch.autograd.grad(swr_reference(a64, x64, 2, 16), (a64, x64), dy.double())
    other = dy.bfloat16() if out == torch.float32 else dy.float()
    for dy_ in (dy, dy, dy, _restrided(dy), _unaligned(dy), other):
        y, got = _trained(swrgen.swr, (a, x), dy_, x.numel() * 4, out_dtype=out)
        y_op, got_op = _trained_by_the_op(swrgen.swr, (a, x), dy_, out_dtype=out)
        assert type(y.grad_fn).__name__ == "_SwrTrainCallFunctionBackward" and type(y_op.grad_fn) is not type(y.grad_fn)
        assert torch.equal(y, y_op) and torch.equal(got[0], got_op[0]) and torch.equal(got[1], got_op[1])
        if dy_ is not other:
            tol = 2e-2 if out == torch.bfloat16 else 5e-3
            assert rel_err(got[0], want[0]) <= tol and rel_err(got[1], want[1]) <= tol
    trained = [c for c in REGISTRY.calls.values() if isinstance(c, swr_op.TrainCall) and c.ks.spec.recurrence.head_dim
               == head_dim]  # fmt: skip
    assert trained and all(c._bwd is not None for c in trained)  # the backward's plan was cached


@pytest.mark.parametrize("offsets", [[0, 1, 17, 1000, 1016, 4000], [0, 1024, 1040, 4000]], ids=["odd", "aligned"])
def test_remembered_packed_calls_equal_the_custom_ops_bitwise(offsets):
    """Packed calls with host-int offsets, repeated (a remembered call with its layout's plans), give the
    custom ops' outputs and gradients bit for bit, swrgen.swr and phalanx_gating, also for a dy the
    remembered backward does not take; and the float64 reference's within tolerance."""
    a, x = make_inputs(1, 3, 16, offsets[-1], seed=len(offsets))
    dy = torch.randn(x.shape, device="cuda")
    cu = torch.tensor(offsets)
    grads = []
    for dy_ in (dy, dy, dy, dy.bfloat16()):
        y, got = _trained(swrgen.swr, (a, x), dy_, x.numel() * 4, cu_seqlens=offsets)
        y_op, got_op = _trained_by_the_op(swrgen.swr, (a, x), dy_, cu_seqlens=cu)
        assert type(y.grad_fn).__name__ == "_SwrTrainCallFunctionBackward"
        assert torch.equal(y, y_op) and torch.equal(got[0], got_op[0]) and torch.equal(got[1], got_op[1])
        with torch.no_grad():
            assert torch.equal(_swr(a, x, cu_seqlens=tuple(offsets)), y_op)
        grads.append(got)
    for s, e in itertools.pairwise(offsets):
        a64, x64 = _leaves(a[..., s:e].double(), x[..., s:e].double())
        ref = swr_reference(a64, x64, 2, 16)
        da, dx = torch.autograd.grad(ref, (a64, x64), dy[..., s:e].double())
        assert rel_err(y[..., s:e], ref) <= 2e-3, f"y of [{s}, {e})"
        assert rel_err(grads[0][0][..., s:e], da) <= 5e-3 and rel_err(grads[0][1][..., s:e], dx) <= 5e-3
    layout = GatingLayout(8, 4, 16)
    P = _projections(1, offsets[-1], layout, seed=len(offsets))
    dZ = torch.randn(1, offsets[-1], layout.inner, device="cuda").bfloat16()
    for _ in range(3):
        Z, (got,) = _trained(swrgen.phalanx_gating, (P,), dZ, P.numel() * 2, heads=8, kv_heads=4, cu_seqlens=offsets)
        Z_op, (got_op,) = _trained_by_the_op(swrgen.phalanx_gating, (P,), dZ, heads=8, kv_heads=4, cu_seqlens=cu)
        assert type(Z.grad_fn).__name__ == "_PhalanxTrainCallFunctionBackward"
        assert torch.equal(Z, Z_op) and torch.equal(got, got_op)
    s, e = offsets[-2], offsets[-1]
    P64 = P[:, s:e].double().requires_grad_()
    rZ = phalanx_gating_reference(P64, layout, 2, 16, 0.8)
    assert rel_err(Z[:, s:e], rZ.detach()) <= 1e-2


def test_tuned_store_change_takes_effect_on_the_next_call(tmp_path, monkeypatch):
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path))
    store.clear_memo()
    try:
        a, x = make_inputs(2, 4, 16, 4096, seed=2)
        y0 = _swr(a, x)
        _swr(a, x)  # a hit
        ks = swr_op.default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
        assert launch.forward_plan(ks, a, x).threads != 8 * 32
        target = {"warps_per_cta": 8, "tiles_per_warp": 3}
        store.save(ks.spec, ks.on(x.get_device()).arch, tuple(x.shape), {"target": target})
        assert len(REGISTRY.calls) == 0  # the store told the registry: no validated call embeds a stale plan
        y1 = _swr(a, x)
        plan = launch.forward_plan(ks, a, x)
        assert plan.threads == 8 * 32 and plan.params.tiles_per_warp == 3  # the tuned variant's kernel
        assert any(c.plan is plan for c in REGISTRY.calls.values())  # and the public call launched it
        assert torch.equal(y1, y0)  # knobs never change results
        assert torch.equal(_swr(a, x), y0)
    finally:
        store.clear_memo()


def _projections(batch, length, layout, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, length, layout.width, generator=g).to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize(("heads", "kv_heads"), [(1, 1), (8, 4), (4, 4)])
def test_fused_fast_path_equals_custom_op_bitwise(heads, kv_heads):
    layout = GatingLayout(heads, kv_heads, 16)
    P = _projections(2, 1000, layout, seed=heads + kv_heads)
    with _SeeTheOp():
        Z_op = swrgen.phalanx_gating(P, heads=heads, kv_heads=kv_heads)
    for _ in range(3):
        _poison_allocator(Z_op.numel() * 2)
        Z = swrgen.phalanx_gating(P, heads=heads, kv_heads=kv_heads)
        assert torch.equal(Z, Z_op)
    assert rel_err(Z, phalanx_gating_reference(P, layout, 2, 16, 0.8)) <= 1e-2
    Z5 = swrgen.phalanx_gating(P, heads=heads, kv_heads=kv_heads, decay_max=0.5)
    assert rel_err(Z5, phalanx_gating_reference(P, layout, 2, 16, 0.5)) <= 1e-2
    shifted = torch.empty(P.numel() + 1, dtype=P.dtype, device=P.device)[1:].view(P.shape)
    shifted.copy_(P)
    assert torch.equal(swrgen.phalanx_gating(shifted, heads=heads, kv_heads=kv_heads), Z_op)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 4)])
def test_fused_training_calls_equal_the_custom_ops_bitwise(heads, kv_heads):
    layout = GatingLayout(heads, kv_heads, 16)
    P = _projections(2, 1000, layout, seed=heads * kv_heads)
    dZ = torch.randn(2, 1000, layout.inner, device="cuda").bfloat16()
    P64 = P.double().requires_grad_()
    (want,) = torch.autograd.grad(phalanx_gating_reference(P64, layout, 2, 16, 0.8), P64, dZ.double())
    for dZ_ in (dZ, dZ, dZ, _restrided(dZ), _unaligned(dZ), dZ.float()):
        Z, (got,) = _trained(swrgen.phalanx_gating, (P,), dZ_, P.numel() * 2, heads=heads, kv_heads=kv_heads)
        Z_op, (got_op,) = _trained_by_the_op(swrgen.phalanx_gating, (P,), dZ_, heads=heads, kv_heads=kv_heads)
        assert type(Z.grad_fn).__name__ == "_PhalanxTrainCallFunctionBackward"
        assert torch.equal(Z, Z_op) and torch.equal(got, got_op)
        assert rel_err(got, want) <= 2e-2


def test_fused_tuned_store_change_takes_effect(tmp_path, monkeypatch):
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path))
    store.clear_memo()
    try:
        layout = GatingLayout(4, 4, 16)
        P = _projections(2, 2048, layout, seed=3)
        Z0 = swrgen.phalanx_gating(P, heads=4)
        ks = swr_op.default_kernels(16, False, P.dtype, P.dtype, 2, 16, P.dtype, True)
        target = {"warps_per_cta": 2, "tiles_per_warp": 3}
        # The fused kernels' bucket: (B, H, 16, L).
        store.save(ks.spec, ks.on(P.get_device()).arch, (2, 4, 16, 2048), {"target": target})
        Z1 = swrgen.phalanx_gating(P, heads=4)
        plan = fused_launch.forward_plan(ks, P, layout, 0.8)
        assert plan.threads == 2 * 32 and plan.params.tiles_per_warp == 3
        assert any(c.plan is plan for c in REGISTRY.calls.values())
        assert torch.equal(Z1, Z0)
    finally:
        store.clear_memo()


def test_concurrent_calls_from_two_threads():
    shapes = [(2, 3, 16, 1000), (2, 3, 16, 1000), (1, 2, 16, 4096)]  # two threads share the first plan
    inputs = [make_inputs(*s, seed=i) for i, s in enumerate(shapes)]
    want = [swrgen.swr(a, x) for a, x in inputs]
    errors: list[str] = []

    def work(i: int) -> None:
        a, x = inputs[i]
        for _ in range(200):
            y = swrgen.swr(a, x)
            if not torch.equal(y, want[i]):
                errors.append(f"thread {i}: wrong result")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors


def test_fast_path_inside_cuda_graph_and_compile():
    a, x = make_inputs(1, 2, 16, 256, seed=5)
    want = swrgen.swr(a, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        swrgen.swr(a, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = swrgen.swr(a, x)
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, 2 * want)  # the captured launch reads x's memory, not a copy
    x.div_(2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, x: swrgen.swr(a, x) + 1, fullgraph=True)
    assert torch.equal(compiled(a, x), want + 1)
