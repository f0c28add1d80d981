"""swr_reference (O(L*k) ground truth) against swr_direct (explicit masked transfer operator) and the
defining properties of the jagged window (docs/semantics.md)."""

from __future__ import annotations

import time

import pytest
import torch

from swrgen.ops.swr.reference import swr_direct, swr_reference
from swrgen.ops.swr.tiled import swr_tiled_forward

F64 = torch.float64


def make_gates(gen: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "unit":  # (0, 1)
        return torch.rand(shape, generator=gen, dtype=F64) * 0.98 + 0.01
    if kind == "mixed":  # zeros, negatives and > 1, bounded
        a = torch.empty(shape, dtype=F64).uniform_(-1.5, 1.5, generator=gen)
        return torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.1, torch.zeros((), dtype=F64), a)
    raise ValueError(kind)


def make_inputs(
    seed: int, layout: str, kind: str, B: int, H: int, DH: int, L: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a_shape = (B, H, L) if layout == "per_head" else (B, H, DH, L)
    a = make_gates(gen, a_shape, kind)
    x = torch.randn(B, H, DH, L, generator=gen, dtype=F64)
    return a, x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10) -> None:
    # Relative to the tensor's scale: products of gates > 1 can make entries large.
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def window_start(t: int, k: int, BL: int) -> int:
    return max(0, (t // BL - k + 1) * BL)


@pytest.mark.parametrize("layout", ["per_head", "per_channel"])
@pytest.mark.parametrize("kind", ["unit", "mixed"])
@pytest.mark.parametrize("BL", [16, 32])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_reference_matches_direct(k: int, BL: int, kind: str, layout: str) -> None:
    for L in (1, 15, 16, 17, 33, 100):
        a, x = make_inputs(1000 * k + BL + L, layout, kind, 2, 2, 3, L)
        y = swr_reference(a, x, window_blocks=k, block_len=BL)
        assert y.dtype == F64 and y.shape == x.shape
        assert_close(y, swr_direct(a, x, k, BL))


def test_direct_matches_hand_computed_sum() -> None:
    # Independent of both implementations: the defining double sum, term by term, for a few tokens.
    a, x = make_inputs(7, "per_channel", "mixed", 1, 1, 2, 23)
    k, BL = 2, 5
    y = swr_direct(a, x, k, BL)
    for t in (0, 4, 5, 9, 10, 14, 22):
        expect = torch.zeros(2, dtype=F64)
        for s in range(window_start(t, k, BL), t + 1):
            prod = torch.ones(2, dtype=F64)
            for q in range(s + 1, t + 1):
                prod = prod * a[0, 0, :, q]
            expect = expect + prod * x[0, 0, :, s]
        assert_close(y[0, 0, :, t], expect)


def test_reference_upcasts_and_rejects_bad_shapes() -> None:
    a, x = make_inputs(3, "per_head", "unit", 1, 2, 4, 40)
    y32 = swr_reference(a.float(), x.float(), 2, 16)
    assert y32.dtype == F64
    assert_close(y32, swr_reference(a.float().double(), x.float().double(), 2, 16))
    with pytest.raises(ValueError):
        swr_reference(a[..., :-1], x, 2, 16)
    with pytest.raises(ValueError):
        swr_reference(a, x, 0, 16)


@pytest.mark.parametrize("layout", ["per_head", "per_channel"])
def test_k1_is_block_diagonal(layout: str) -> None:
    BL, L = 16, 48
    a, x = make_inputs(11, layout, "unit", 1, 1, 4, L)
    y0 = swr_reference(a, x, 1, BL)
    x1 = x.clone()
    x1[..., 20] += 1.0  # a token of tile 1
    y1 = swr_reference(a, x1, 1, BL)
    assert torch.equal(y1[..., :20], y0[..., :20])  # before it
    assert (y1[..., 20:32] != y0[..., 20:32]).all()  # rest of its own tile
    assert torch.equal(y1[..., 32:], y0[..., 32:])  # next tile: no carry at k=1


@pytest.mark.parametrize("k,BL", [(1, 4), (2, 4), (3, 5), (2, 16)])
def test_window_of_each_token_is_exact(k: int, BL: int) -> None:
    """y_t depends on u_s exactly for s in [window_start(t), t], and on a_q exactly for q in
    (window_start(t), t] (each batch entry perturbs one token)."""
    L, DH = 41, 2
    a, x = make_inputs(23, "per_head", "unit", 1, 1, DH, L)
    y0 = swr_reference(a, x, k, BL)[0, 0]
    ts = torch.arange(L).view(L, 1)
    starts = torch.tensor([window_start(t, k, BL) for t in range(L)]).view(L, 1)

    xs = x.expand(L, 1, DH, L).clone()
    xs[torch.arange(L), 0, 0, torch.arange(L)] += 1.0  # entry s perturbs u_s on channel 0 only
    changed = swr_reference(a.expand(L, 1, L), xs, k, BL)[:, 0] != y0  # [s, DH, t]
    expect = (ts.T >= torch.arange(L).view(L, 1)) & (starts.T <= torch.arange(L).view(L, 1))  # [s, t]
    assert torch.equal(changed[:, 0, :], expect)
    assert not changed[:, 1, :].any()  # channels are independent

    as_ = a.expand(L, 1, L).clone()
    as_[torch.arange(L), 0, torch.arange(L)] += 0.25  # entry q perturbs a_q
    changed = (swr_reference(as_, x.expand(L, 1, DH, L), k, BL)[:, 0] != y0).any(dim=1)  # [q, t]
    qs = torch.arange(L).view(L, 1)
    expect = (qs <= ts.T) & (qs > starts.T)
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("layout", ["per_head", "per_channel"])
@pytest.mark.parametrize("k,BL,L", [(1, 3, 7), (2, 3, 8), (3, 2, 9)])
def test_gradcheck(layout: str, k: int, BL: int, L: int) -> None:
    a, x = make_inputs(5, layout, "mixed", 1, 2, 2, L)
    a.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a_, x_: swr_reference(a_, x_, k, BL), (a, x))


def test_long_sequence_smoke() -> None:
    L, BL, k = 131072, 16, 2
    a, x = make_inputs(99, "per_head", "unit", 1, 1, 16, L)
    t0 = time.perf_counter()
    y = swr_reference(a, x, k, BL)
    assert time.perf_counter() - t0 < 20.0
    assert torch.isfinite(y).all()
    assert_close(y, swr_tiled_forward(a, x, k, BL))
    assert_close(y, swr_tiled_forward(a, x, k, BL, tiles_per_chunk=1000))
