"""The kernel's tile algorithm (tiled.py) against the float64 reference: forward against swr_reference,
closed-form backward against torch autograd of swr_reference, for every chunking."""

from __future__ import annotations

import zlib

import pytest
import torch

from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.tiled import swr_tiled_backward, swr_tiled_forward

F64 = torch.float64
LENGTHS = (1, 15, 16, 17, 33, 64, 100)
CHUNKINGS = (None, 1, 2, 3, 5)


def make_gates(gen: torch.Generator, shape: tuple[int, ...], kind: str, BL: int) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=F64)
    if kind == "unit":
        return u * 0.98 + 0.01
    if kind == "near0":
        return u * 1e-3
    if kind == "near1":
        return 1.0 - u * 1e-3
    if kind == "zeros":  # exact zeros at random places, including tile starts, tile ends and t = 0
        a = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.2, torch.zeros((), dtype=F64), u)
        t = torch.arange(shape[-1])
        edge = (t % BL == 0) | (t % BL == BL - 1)
        return torch.where(edge & (torch.rand(shape, generator=gen, dtype=F64) < 0.5), 0.0, a)
    if kind == "negative":
        return -(u * 1.0 + 0.2)
    if kind == "mixed":  # zeros, negatives, > 1
        a = u * 3.0 - 1.5
        return torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.1, torch.zeros((), dtype=F64), a)
    raise ValueError(kind)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("kind", ["unit", "near0", "near1", "zeros", "negative", "mixed"])
@pytest.mark.parametrize("layout", ["per_head", "per_channel"])
@pytest.mark.parametrize("BL", [16, 32])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tiled_matches_reference_and_autograd(k: int, BL: int, layout: str, kind: str) -> None:
    B, H, DH = 2, 2, 3
    for L in LENGTHS:
        # crc32, not hash(): str hashing is salted per process, seeds must be reproducible.
        gen = torch.Generator().manual_seed(zlib.crc32(repr((k, BL, layout, kind, L)).encode()))
        a = make_gates(gen, (B, H, L) if layout == "per_head" else (B, H, DH, L), kind, BL)
        x = torch.randn(B, H, DH, L, generator=gen, dtype=F64)
        dy = torch.randn(B, H, DH, L, generator=gen, dtype=F64)
        a_ = a.clone().requires_grad_()
        x_ = x.clone().requires_grad_()
        y = swr_reference(a_, x_, k, BL)
        da_ref, dx_ref = torch.autograd.grad(y, (a_, x_), dy)
        y = y.detach()
        for tpc in CHUNKINGS:
            assert_close(swr_tiled_forward(a, x, k, BL, tiles_per_chunk=tpc), y)
            dx, da = swr_tiled_backward(a, x, dy, k, BL, tiles_per_chunk=tpc)
            assert dx.shape == x.shape and da.shape == a.shape
            assert dx.dtype == F64 and da.dtype == F64
            assert_close(dx, dx_ref)
            assert_close(da, da_ref)


def test_first_gate_has_no_gradient_and_chunking_is_invisible() -> None:
    # a_0 multiplies nothing (prod_{q=s+1..t} never reaches q = 0); chunk edges must not be visible.
    gen = torch.Generator().manual_seed(3)
    k, BL, L = 3, 16, 16 * 13 + 5
    a = torch.rand(1, 2, L, generator=gen, dtype=F64)
    x = torch.randn(1, 2, 4, L, generator=gen, dtype=F64)
    dy = torch.randn(1, 2, 4, L, generator=gen, dtype=F64)
    y0 = swr_tiled_forward(a, x, k, BL)
    dx0, da0 = swr_tiled_backward(a, x, dy, k, BL)
    assert torch.equal(da0[..., 0], torch.zeros_like(da0[..., 0]))
    assert (da0[..., 1:] != 0).all()
    for tpc in (1, 2, 4, 7, 13, 100):
        assert_close(swr_tiled_forward(a, x, k, BL, tiles_per_chunk=tpc), y0, 1e-13)
        dx, da = swr_tiled_backward(a, x, dy, k, BL, tiles_per_chunk=tpc)
        assert_close(dx, dx0, 1e-13)
        assert_close(da, da0, 1e-13)


def test_rejects_bad_arguments() -> None:
    a = torch.rand(1, 1, 20, dtype=F64)
    x = torch.randn(1, 1, 2, 20, dtype=F64)
    with pytest.raises(ValueError):
        swr_tiled_forward(a, x, 2, 16, tiles_per_chunk=0)
    with pytest.raises(ValueError):
        swr_tiled_backward(a, x, x[..., :-1], 2, 16)
