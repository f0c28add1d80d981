"""GPU tests of ``target.staging: shared`` (cp.async stage rings in shared memory; skip without CUDA).

Staging only moves where loads wait, so every result must be bitwise the register path's, which the
other GPU tests hold to the float64 reference; each case here checks the reference too. Cases: the
recurrence variants, the edges of a chunk, a batch and a CTA (lengths and knobs), packed sequences and
streams resumed mid-tile. Outputs are poisoned with NaN first, so an element never written shows.
"""

from __future__ import annotations

import pytest
import torch

import swrgen
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from tests.gpu_util import (
    BWD_VARIANTS,
    FWD_VARIANTS,
    SHARED_KNOBS,
    make_inputs,
    rel_err,
    shared,
    spec_for,
    torch_dtype,
)

pytestmark = pytest.mark.gpu

POISON = float("nan")


def inputs(spec, batch, heads, length, seed):
    r = spec.recurrence
    return make_inputs(batch, heads, r.head_dim, length, dtype=torch_dtype(r.input_dtype),
                       gate_dtype=torch_dtype(r.gate_dtype), per_channel=r.gate_layout == "per_channel",
                       seed=seed)  # fmt: skip


def forward(spec, a, x):
    return launch.forward(swrgen.load(spec).kernels, a, x, poison=POISON)[0]


def backward(spec, a, x, dy):
    return launch.backward(swrgen.load(spec).kernels, a, x, dy, poison=POISON)[:2]


def ref_forward_backward(spec, a, x, dy):
    r = spec.recurrence
    a64, x64 = a.double().requires_grad_(), x.double().requires_grad_()
    y = swr_reference(a64, x64, r.window_blocks, r.block_len)
    dx, da = torch.autograd.grad(y, (x64, a64), dy.double())
    return y.detach(), dx, da


def check_equal_and_reference(base, staged, a, x, dy, fwd_tol=2e-3, bwd_tol=5e-3):
    y_reg, y_sh = forward(base, a, x), forward(staged, a, x)
    assert torch.equal(y_sh, y_reg), f"shared staging changed y ({staged.target})"
    dx_reg, da_reg = backward(base, a, x, dy)
    dx_sh, da_sh = backward(staged, a, x, dy)
    assert torch.equal(dx_sh, dx_reg) and torch.equal(da_sh, da_reg), f"shared staging changed dx/da ({staged.target})"
    ry, rdx, rda = ref_forward_backward(base, a, x, dy)
    assert rel_err(y_sh, ry) <= fwd_tol
    assert rel_err(dx_sh, rdx) <= bwd_tol and rel_err(da_sh, rda) <= bwd_tol


@pytest.mark.parametrize("kw", [dict(), *FWD_VARIANTS, *BWD_VARIANTS], ids=str)
@pytest.mark.parametrize("length", [4096, 4104, 4160])
def test_shared_staging_variants(kw, length):
    base = spec_for(**kw)
    staged = shared(base)
    a, x = inputs(base, 2, 3, length, seed=length + 7)
    dy = torch.randn(x.shape, device=x.device).to(torch_dtype(base.recurrence.output_dtype))
    vec = launch.forward_plan(swrgen.load(staged).kernels, a, x).kernel.name.endswith("_vec")
    assert vec == (length % (base.recurrence.block_len // 2) == 0)  # else the element-wise kernel runs
    tol = 2e-3 if base.recurrence.output_dtype == "fp32" else 8e-3
    check_equal_and_reference(base, staged, a, x, dy, fwd_tol=tol)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("knobs", SHARED_KNOBS, ids=str)
@pytest.mark.parametrize("length", [8, 16, 24, 1000, 8200])
def test_shared_staging_edges(k, knobs, length):
    base = spec_for(k=k)
    a, x = inputs(base, 2, 3, length, seed=length + k)
    dy = torch.randn(x.shape, device=x.device)
    check_equal_and_reference(base, shared(base, **knobs), a, x, dy)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("knobs", [dict(), dict(warps_per_cta=1, tiles_per_warp=3, min_warps_per_sm=24),
                                   dict(tiles_in_flight=2, stages=3, tiles_per_warp=7)], ids=str)  # fmt: skip
@pytest.mark.parametrize("length", [24, 1000, 8200])
def test_shared_staging_y_in_place(k, knobs, length):
    """bf16 in and out: the forward writes y over x in the stage (no output buffer)."""
    base = spec_for(k=k, out="bf16")
    a, x = inputs(base, 2, 3, length, seed=length + 5 * k)
    dy = torch.randn(x.shape, device=x.device).bfloat16()
    check_equal_and_reference(base, shared(base, **knobs), a, x, dy, fwd_tol=8e-3)


@pytest.mark.parametrize("k", [2, 3])
def test_shared_staging_long(k):
    base = spec_for(k=k)
    a, x = inputs(base, 1, 2, 131072, seed=k)
    dy = torch.randn(x.shape, device=x.device)
    check_equal_and_reference(base, shared(base), a, x, dy)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_staging_packed_sequences(k):
    base = spec_for(k=k)
    staged = shared(base, tiles_per_warp=3)
    lens = [8, 1024, 16, 4096, 40, 200]  # multiples of 8: the vector kernel
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    a, x = inputs(base, 1, 3, int(cu[-1]), seed=k)
    outs = {}
    for spec in (base, staged):
        a_, x_ = a.clone().requires_grad_(), x.clone().requires_grad_()
        y = swrgen.swr(a_, x_, spec=spec, cu_seqlens=cu)
        y.backward(torch.ones_like(y) * 0.5 + torch.arange(y.shape[-1], device=y.device) % 3)
        outs[spec.target.staging] = (y.detach(), x_.grad, a_.grad)
    for reg, sh in zip(outs["registers"], outs["shared"], strict=True):
        assert torch.equal(sh, reg)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = swr_reference(a[..., s:e].double(), x[..., s:e].double(), k, 16)
        assert rel_err(outs["shared"][0][..., s:e], ref) <= 2e-3, f"sequence [{s}, {e})"


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("split", [8, 24, 1032])  # a stream resumed mid-tile (phase 8) or at a tile start
def test_shared_staging_resumed_stream(k, split):
    base = spec_for(k=k)
    staged = shared(base, tiles_per_warp=5)
    a, x = inputs(base, 2, 3, 2104, seed=split + k)
    ys = {}
    for spec in (base, staged):
        y1, st = swrgen.swr(a[..., :split], x[..., :split], spec=spec, return_state=True)
        y2 = swrgen.swr(a[..., split:], x[..., split:], spec=spec, initial_state=st)
        ys[spec.target.staging] = torch.cat([y1, y2], dim=-1)
    assert torch.equal(ys["shared"], ys["registers"])
    assert rel_err(ys["shared"], swr_reference(a.double(), x.double(), k, 16)) <= 2e-3
