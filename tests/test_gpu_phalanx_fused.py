"""GPU tests of the fused Phalanx kernels (phalanx_fwd / phalanx_bwd) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import swrgen
from swrgen.nn import Phalanx
from swrgen.ops.phalanx import GatingLayout, launch
from swrgen.ops.phalanx.reference import phalanx_gating_reference
from tests.gpu_util import TUNING, rel_err
from tests.gpu_util import fused_spec_for as fused_spec

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error (norm) allowed against float64: the output is stored in the input dtype.
TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}


def make_projections(batch, length, layout, dtype, seed):
    """Fresh random projections (never zeros): gate logits ~ N(0, 2), the rest ~ N(0, 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = torch.randn(batch, length, layout.width, generator=g)
    P[..., : layout.heads] *= 2
    return P.to(device="cuda", dtype=dtype)


def run(spec, P, layout, dm, dZ=None):
    program = swrgen.load(spec).kernels
    Z, _, _ = launch.forward(program, P, layout, dm, poison=float("nan"))
    dP = None if dZ is None else launch.backward(program, P, dZ, layout, dm, poison=float("nan"))[0]
    return Z, dP


def reference(P, layout, k, bl, dm, dZ):
    P64 = P.double().requires_grad_()
    Z = phalanx_gating_reference(P64, layout, k, bl, dm)
    (dP,) = torch.autograd.grad(Z, P64, dZ.double())
    return Z.detach(), dP


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000, 8192, 8193])
def test_fused_matches_reference(k, length):
    layout = GatingLayout(8, 8, 16)  # aligned blocks: the vec kernels (test_vec_equals_scalar covers the rest)
    P = make_projections(2, length, layout, torch.bfloat16, seed=length + 10 * k)
    dZ = torch.randn(2, length, layout.inner, device="cuda", dtype=torch.bfloat16)
    Z, dP = run(fused_spec(k=k), P, layout, 0.8, dZ)
    rZ, rdP = reference(P, layout, k, 16, 0.8, dZ)
    assert rel_err(Z, rZ) <= TOL["bf16"]
    assert rel_err(dP, rdP) <= TOL["bf16"]
    # Every block of columns, not just the norm over all of them.
    for lo, n in zip((layout.col_a, layout.col_b, layout.col_c, layout.col_v), layout.split, strict=True):
        assert rel_err(dP[..., lo : lo + n], rdP[..., lo : lo + n]) <= 2 * TOL["bf16"]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("bl", [16, 32, 64])
def test_fused_dtypes_gqa_block_lens(dtype, kv_heads, bl):
    layout = GatingLayout(8, kv_heads, 16)
    length = 3 * bl + 5
    P = make_projections(3, length, layout, DTYPES[dtype], seed=bl + kv_heads)
    dZ = torch.randn(3, length, layout.inner, device="cuda", dtype=DTYPES[dtype])
    Z, dP = run(fused_spec(k=2, bl=bl, dtype=dtype), P, layout, 0.7, dZ)
    rZ, rdP = reference(P, layout, 2, bl, 0.7, dZ)
    assert rel_err(Z, rZ) <= TOL[dtype]
    assert rel_err(dP, rdP) <= TOL[dtype]


def test_fused_strided_projection():
    """P and dZ as column slices of wider buffers (token strides > their widths)."""
    layout = GatingLayout(8, 2, 16)
    big = make_projections(2, 333, GatingLayout(8, 8, 16), torch.bfloat16, seed=3)
    P = big[..., 5 : 5 + layout.width]
    assert P.stride(1) != layout.width
    dZ = torch.randn(2, 333, layout.inner + 24, device="cuda", dtype=torch.bfloat16)[..., 8 : 8 + layout.inner]
    Z, dP = run(fused_spec(), P, layout, 0.8, dZ)
    rZ, rdP = reference(P, layout, 2, 16, 0.8, dZ)
    assert rel_err(Z, rZ) <= TOL["bf16"]
    assert rel_err(dP, rdP) <= TOL["bf16"]
    # A gradient with a non-unit channel stride (e.g. expanded) is copied by the launcher, not misread.
    dZ2 = torch.randn(2, 333, 2 * layout.inner, device="cuda", dtype=torch.bfloat16)[..., ::2]
    _, dP2 = run(fused_spec(), P, layout, 0.8, dZ2)
    assert rel_err(dP2, reference(P, layout, 2, 16, 0.8, dZ2)[1]) <= TOL["bf16"]


@pytest.mark.parametrize("heads", [6, 8], ids=["scalar", "vec"])  # column blocks 16-byte aligned or not
@pytest.mark.parametrize("knobs", TUNING, ids=str)
def test_fused_identical_across_tuning(knobs, heads):
    layout = GatingLayout(heads, heads // 2, 16)
    P = make_projections(2, 5000, layout, torch.bfloat16, seed=7)
    dZ = torch.randn(2, 5000, layout.inner, device="cuda", dtype=torch.bfloat16)
    Z0, dP0 = run(fused_spec(k=3), P, layout, 0.8, dZ)
    Z1, dP1 = run(fused_spec(k=3, **knobs), P, layout, 0.8, dZ)
    assert torch.equal(Z0, Z1)
    assert torch.equal(dP0, dP1)


CTA_WARPS = (1, 2, 4, 8, 16)  # tests/gpu_util.py pre-builds these


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kv_div", [1, 4], ids=["mha", "gqa"])
@pytest.mark.parametrize("heads", [8, 24])
def test_fused_cta_loads_or_not(heads, kv_div, k):
    """The fused forward's CTA loads (a CTA moves its heads' token rows and gate logits together: 2, 4 and 8
    warps) and its warps' own loads (1 warp a CTA; 16, whose shared tiles would not fit) give the same bits,
    and the reference's values; so does the backward (its warps' own loads) across the same warp counts.
    Short chunks, a partial tile and three batch entries put chunk and row edges inside CTAs' reach; gqa
    sends dB and dC to the per-head buffer."""
    layout = GatingLayout(heads, heads // kv_div, 16)
    length = 16 * 20 + 9
    P = make_projections(3, length, layout, torch.bfloat16, seed=heads + kv_div + k)
    g = torch.Generator(device="cpu").manual_seed(heads * k)
    dZ = torch.randn(3, length, layout.inner, generator=g).to(device="cuda", dtype=torch.bfloat16)
    out = {w: run(fused_spec(k=k, warps_per_cta=w, tiles_per_warp=3), P, layout, 0.8, dZ) for w in CTA_WARPS}
    for w in CTA_WARPS[1:]:
        assert torch.equal(out[w][0], out[1][0]), ("Z", w)
        assert torch.equal(out[w][1], out[1][1]), ("dP", w)
    rZ, rdP = reference(P, layout, k, 16, 0.8, dZ)
    assert rel_err(out[1][0], rZ) <= TOL["bf16"]
    assert rel_err(out[1][1], rdP) <= TOL["bf16"]


def test_fused_autograd_compile_and_layer():
    torch.manual_seed(0)
    m = Phalanx(256, kv_heads=4, fused=False, device="cuda", dtype=torch.bfloat16)
    f = Phalanx(256, kv_heads=4, device="cuda", dtype=torch.bfloat16)  # fused=None: fused on CUDA
    f.load_state_dict(m.state_dict())
    x = torch.randn(2, 1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y0, y1 = m(x), f(x)
    g = torch.randn_like(y0)
    g0 = torch.autograd.grad(y0, [x, *m.parameters()], g)
    g1 = torch.autograd.grad(y1, [x, *f.parameters()], g)
    assert rel_err(y1, y0) <= 2e-2
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) <= 3e-2
    compiled = torch.compile(f, fullgraph=True)
    y2 = compiled(x)
    (gx2,) = torch.autograd.grad(y2, x, g)
    assert rel_err(y2, y1) <= 1e-2  # compiled GEMMs may differ in rounding; the fused op is the same
    assert rel_err(gx2, g1[0]) <= 1e-2
    with torch.no_grad():  # the inference fast path launches the same kernel
        assert torch.equal(f(x), y1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(("k", "bl", "length"), [(2, 16, 1), (2, 16, 17), (2, 16, 4099), (3, 32, 1000), (1, 64, 333)])
def test_vec_equals_scalar(dtype, k, bl, length):
    """The 16-byte vector kernels and the element-wise ones compute the same floats: bitwise equal."""
    layout = GatingLayout(8, 4, 16)
    P = make_projections(2, length, layout, DTYPES[dtype], seed=length)
    dZ = torch.randn(2, length, layout.inner, device="cuda", dtype=DTYPES[dtype])
    # The same values one element into a larger buffer: misaligned, so the scalar kernels run.
    Pm = torch.empty(P.numel() + 1, device="cuda", dtype=P.dtype)[1:].view(P.shape)
    Pm.copy_(P)
    assert launch.use_vector_kernel(layout, P) and not launch.use_vector_kernel(layout, Pm)
    spec = fused_spec(k=k, bl=bl, dtype=dtype)
    Z, dP = run(spec, P, layout, 0.8, dZ)
    Zm, dPm = run(spec, Pm, layout, 0.8, dZ)
    assert torch.equal(Z, Zm)
    assert torch.equal(dP, dPm)
    rZ, rdP = reference(P, layout, k, bl, 0.8, dZ)
    assert rel_err(Z, rZ) <= TOL[dtype]
    assert rel_err(dP, rdP) <= TOL[dtype]
