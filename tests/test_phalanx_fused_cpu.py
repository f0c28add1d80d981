"""The fused Phalanx gating op on the CPU: its reference, closed-form backward, layer wiring and errors."""

from __future__ import annotations

import pytest
import torch

import swrgen
from swrgen.nn import Phalanx
from swrgen.ops.phalanx import GatingLayout
from swrgen.ops.phalanx.reference import phalanx_gating_reference


def projections(batch, length, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, layout.width, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize(("k", "bl", "length"), [(1, 16, 40), (2, 16, 33), (3, 8, 50), (2, 4, 7)])
def test_op_backward_is_autograd_of_reference(kv_heads, k, bl, length):
    layout = GatingLayout(4, kv_heads, 16)
    P = projections(2, length, layout, seed=length).requires_grad_()
    Z = swrgen.phalanx_gating(P, heads=4, kv_heads=kv_heads, window_blocks=k, block_len=bl, decay_max=0.7)
    Zr = phalanx_gating_reference(P, layout, k, bl, 0.7)  # independent code: the window-restart recurrence
    torch.testing.assert_close(Z, Zr, rtol=1e-12, atol=1e-12)
    dZ = torch.randn_like(Z)
    (dP,) = torch.autograd.grad(Z, P, dZ)  # the op's closed form
    (dPr,) = torch.autograd.grad(Zr, P, dZ)  # autograd through the reference
    torch.testing.assert_close(dP, dPr, rtol=1e-10, atol=1e-12)


def test_reference_is_the_layer_formula():
    """Z from the projections equals the layer's unfused torch gating (independent code)."""
    torch.manual_seed(1)
    m = Phalanx(64, kv_heads=2, fused=False).double()
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    A, B, C, V = m.project(x)
    a, u = A.transpose(1, 2).contiguous(), (B * V).permute(0, 2, 3, 1).contiguous()
    y = swrgen.swr(a, u, window_blocks=2).permute(0, 3, 1, 2)
    Z = (y * C + V).flatten(2)
    torch.testing.assert_close(phalanx_gating_reference(m.in_proj(x), m.layout, 2, 16, 0.8), Z)


def test_layer_fused_equals_unfused_on_cpu():
    torch.manual_seed(2)
    unfused = Phalanx(48, kv_heads=1, window_blocks=3, fused=False).double()
    fused = Phalanx(48, kv_heads=1, window_blocks=3, fused=True).double()
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(3, 70, 48, dtype=torch.float64, requires_grad=True)
    y0, y1 = unfused(x), fused(x)
    torch.testing.assert_close(y1, y0)
    g = torch.randn_like(y0)
    for a, b in zip(torch.autograd.grad(y1, [x, *fused.parameters()], g),
                    torch.autograd.grad(y0, [x, *unfused.parameters()], g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_layer_fused_defaults_and_errors():
    assert Phalanx(64).fused is None
    assert not Phalanx(64)._use_fused(torch.zeros(1, 1, 64))  # CPU default: the unfused path
    with pytest.raises(ValueError, match="fused=True needs head_dim 16"):
        Phalanx(64, head_dim=32, fused=True)
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        Phalanx(64, fused="yes")


def test_errors_say_what_is_allowed():
    layout = GatingLayout(4, 2, 16)
    P = projections(1, 10, layout)
    with pytest.raises(ValueError, match=r"N = H \+ 2\*KVH\*DH \+ H\*DH = 132"):
        swrgen.phalanx_gating(P[..., :-1], heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="unit stride along its last dim"):
        wide = torch.randn(1, 10, 2 * layout.width, dtype=torch.float64)
        swrgen.phalanx_gating(wide[..., ::2], heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"decay_max must be a number in \(0, 1\]"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2, decay_max=1.5)
    with pytest.raises(ValueError, match="kv_heads=3 does not divide heads=4; allowed kv_heads: \\[1, 2, 4\\]"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=3)
    with pytest.raises(TypeError, match="floating-point"):
        swrgen.phalanx_gating(P.long(), heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="at least one token"):
        swrgen.phalanx_gating(P[:, :0], heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="has no fused Phalanx kernels"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2, spec="specs/hopper_k2.yaml")
    with pytest.raises(ValueError, match="window_blocks=3 disagrees with spec 'hopper_k2_fused'"):
        swrgen.phalanx_gating(P, heads=4, kv_heads=2, window_blocks=3, spec="specs/hopper_k2_fused.yaml")


def test_spec_path_on_cpu_runs_the_reference():
    layout = GatingLayout(2, 2, 16)
    P = projections(1, 20, layout)
    Z = swrgen.phalanx_gating(P, heads=2, spec="specs/hopper_k2_fused.yaml")
    torch.testing.assert_close(Z, phalanx_gating_reference(P, layout, 2, 16, 0.8))


def test_vector_kernel_choice():
    """The vec kernels need 16-bit types, 16-byte aligned rows and B/C/V blocks (checked on the host)."""
    from swrgen.ops.phalanx.launch import use_vector_kernel

    aligned = GatingLayout(8, 4, 16)  # column blocks at 8, 72, 136 elements: 16-byte boundaries
    P = torch.zeros(2, 5, aligned.width, dtype=torch.bfloat16)
    assert use_vector_kernel(aligned, P)
    assert not use_vector_kernel(aligned, P.float())  # fp32: element-wise
    assert not use_vector_kernel(GatingLayout(4, 4, 16), torch.zeros(2, 5, GatingLayout(4, 4, 16).width,
                                                                       dtype=torch.bfloat16))  # fmt: skip
    shifted = torch.zeros(2 * 5 * aligned.width + 1, dtype=torch.bfloat16)[1:].view(2, 5, aligned.width)
    assert not use_vector_kernel(aligned, shifted)
    padded = torch.zeros(2, 5, aligned.width + 3, dtype=torch.bfloat16)[..., : aligned.width]  # row 2*267 bytes
    assert not use_vector_kernel(aligned, padded)
