"""GPU tests of the generated backward kernels and the autograd integration (skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

import swrgen
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from tests.gpu_util import BWD_VARIANTS, TUNING, make_inputs, rel_err, spec_for

pytestmark = pytest.mark.gpu


def _ref_grads(spec, a, x, dy):
    r = spec.recurrence
    a64 = a.double().requires_grad_()
    x64 = x.double().requires_grad_()
    y = swr_reference(a64, x64, r.window_blocks, r.block_len)
    dx, da = torch.autograd.grad(y, (x64, a64), dy.double())
    return dx, da


def _bwd(spec, a, x, dy):
    return launch.backward(swrgen.load(spec).kernels, a, x, dy, poison=float("nan"))[:2]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 15, 17, 1000, 8192, 8193, 32768, 131072])
def test_backward_matches_reference(k, length):
    bh = (1, 2) if length >= 32768 else (2, 3)
    spec = spec_for(k=k)
    a, x = make_inputs(*bh, 16, length, seed=100 + length + k)
    dy = torch.randn(x.shape, device=x.device)
    dx, da = _bwd(spec, a, x, dy)
    rdx, rda = _ref_grads(spec, a, x, dy)
    assert rel_err(dx, rdx) <= 5e-3
    assert rel_err(da, rda) <= 5e-3


@pytest.mark.parametrize("gates", ["near0", "near1", "signed"])
@pytest.mark.parametrize("k", [2, 3])
def test_backward_gate_ranges(gates, k):
    spec = spec_for(k=k)
    a, x = make_inputs(2, 3, 16, 2000, gates=gates, seed=k)
    dy = torch.randn(x.shape, device=x.device)
    dx, da = _bwd(spec, a, x, dy)
    rdx, rda = _ref_grads(spec, a, x, dy)
    assert rel_err(dx, rdx) <= 5e-3
    assert rel_err(da, rda) <= 5e-3


@pytest.mark.parametrize("kw", BWD_VARIANTS, ids=str)
@pytest.mark.parametrize("length", [33, 4096, 4100])
def test_backward_variants(kw, length):
    spec = spec_for(**kw)
    r = spec.recurrence
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    a, x = make_inputs(2, 2, r.head_dim, length, dtype=dt[r.input_dtype], gate_dtype=dt[r.gate_dtype],
                       per_channel=r.gate_layout == "per_channel", seed=length)  # fmt: skip
    dy = torch.randn(x.shape, device=x.device).to(dt[r.output_dtype])
    dx, da = _bwd(spec, a, x, dy)
    rdx, rda = _ref_grads(spec, a, x, dy)
    assert rel_err(dx, rdx) <= 5e-3
    assert rel_err(da, rda) <= 5e-3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_identical_across_tuning_and_deterministic(k):
    base = spec_for(k=k)
    a, x = make_inputs(2, 3, 16, 8193, seed=k)
    dy = torch.randn(x.shape, device=x.device)
    dx0, da0 = _bwd(base, a, x, dy)
    dx1, da1 = _bwd(base, a, x, dy)
    assert torch.equal(dx0, dx1) and torch.equal(da0, da1), "backward is not deterministic"
    for kw in TUNING:
        dx, da = _bwd(base.replace_target(**kw), a, x, dy)
        assert torch.equal(dx, dx0) and torch.equal(da, da0), f"gradients changed with tuning {kw}"


def test_autograd_through_public_op():
    a, x = make_inputs(2, 3, 16, 1000, seed=42)
    a.requires_grad_()
    x.requires_grad_()
    y = swrgen.swr(a, x, window_blocks=2)
    (y * y).sum().backward()
    a64 = a.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = swr_reference(a64, x64, 2, 16)
    (y64 * y64).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 5e-3
    assert rel_err(a.grad, a64.grad) <= 5e-3


def test_expanded_upstream_gradient():
    a, x = make_inputs(1, 2, 16, 100, seed=1)
    a.requires_grad_()
    x.requires_grad_()
    swrgen.swr(a, x).sum().backward()  # dy is an expanded (stride 0) tensor
    a64 = a.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    swr_reference(a64, x64, 2, 16).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 5e-3 and rel_err(a.grad, a64.grad) <= 5e-3


def test_torch_compile_fullgraph_matches_eager():
    a, x = make_inputs(2, 2, 16, 512, seed=3)

    def f(a, x):
        return (swrgen.swr(a, x, window_blocks=2) * 2.0).square().mean()

    a1, x1 = a.clone().requires_grad_(), x.clone().requires_grad_()
    a2, x2 = a.clone().requires_grad_(), x.clone().requires_grad_()
    f(a1, x1).backward()
    torch.compile(f, fullgraph=True)(a2, x2).backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(a1.grad, a2.grad)


def test_cuda_graph_capture_forward_backward():
    a, x = make_inputs(2, 2, 16, 4096, seed=4)
    a.requires_grad_()
    x.requires_grad_()
    dy = torch.randn(x.shape, device=x.device)

    def step():
        a.grad = x.grad = None
        y = swrgen.swr(a, x)
        y.backward(dy)
        return y

    y_eager = step().detach().clone()
    gx, ga = x.grad.clone(), a.grad.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    a.grad = x.grad = None
    with torch.cuda.graph(graph):
        y_static = swrgen.swr(a, x)
        y_static.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager)
    assert torch.equal(x.grad, gx) and torch.equal(a.grad, ga)


def test_peak_memory_is_bounded():
    a, x = make_inputs(4, 16, 16, 8192, seed=6)
    a.requires_grad_()
    x.requires_grad_()
    dy = torch.randn(x.shape, device=x.device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    swrgen.swr(a, x).backward(dy)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # y (fp32) + dx + da + fp32 da partials; nothing of size O(L * block_len) per channel.
    budget = 2 * x.numel() * 4 + x.numel() * x.element_size() + 3 * a.numel() * 4
    assert extra <= budget, f"fwd+bwd used {extra} extra bytes, budget {budget}"
