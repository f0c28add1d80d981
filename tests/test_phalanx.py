"""swrgen.nn.Phalanx on the CPU: shapes, the parametrization (against a hand-written formula on the float64
reference), GQA sharing of B and C, gate bounds, streaming (prefill + step / chunks == full forward),
packed sequences, configuration errors, and gradients. CUDA checks skip without a GPU."""

from __future__ import annotations

import pytest
import torch

from swrgen.nn import Phalanx
from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.state import SwrState

F64 = torch.float64


def layer(dim=32, seed=0, **kw) -> Phalanx:
    torch.manual_seed(seed)
    kw.setdefault("dtype", F64)
    return Phalanx(dim, **kw)


def inputs(B, L, D, seed=1, dtype=F64) -> torch.Tensor:
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def by_hand(m: Phalanx, x: torch.Tensor) -> torch.Tensor:
    """docs/semantics.md ("The Phalanx layer") written out with explicit weights and the float64 reference."""
    H, DH, KVH = m.heads, m.head_dim, m.kv_heads
    W = m.in_proj.weight.double()
    Wa, Wb, Wc, Wv = torch.split(W, [H, KVH * DH, KVH * DH, H * DH], dim=0)
    x = x.double()
    A = m.decay_max * torch.sigmoid(x @ Wa.t())  # [B, L, H]
    Bk = torch.sigmoid(x @ Wb.t()).unflatten(-1, (KVH, DH)).repeat_interleave(H // KVH, dim=-2)
    Ck = (x @ Wc.t()).unflatten(-1, (KVH, DH)).repeat_interleave(H // KVH, dim=-2)
    V = (x @ Wv.t()).unflatten(-1, (H, DH))
    Y = swr_reference(A.permute(0, 2, 1), (Bk * V).permute(0, 2, 3, 1), m.window_blocks, m.block_len)
    Z = Y.permute(0, 3, 1, 2) * Ck + V
    return Z.flatten(-2) @ m.out_proj.weight.double().t()


# --- shapes and parametrization ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "kw", "heads", "kv"),
    [(32, {}, 2, 2), (64, {"kv_heads": 2}, 4, 2), (64, {"kv_heads": 1}, 4, 1), (40, {"heads": 3}, 3, 3),
     (64, {"head_dim": 32}, 2, 2), (48, {"heads": 6, "kv_heads": 3, "window_blocks": 3}, 6, 3)],
)  # fmt: skip
def test_shapes_and_matches_formula(dim, kw, heads, kv) -> None:
    m = layer(dim, **kw)
    assert (m.heads, m.kv_heads, m.inner) == (heads, kv, heads * m.head_dim)
    assert m.in_proj.out_features == heads + 2 * kv * m.head_dim + heads * m.head_dim
    x = inputs(2, 37, dim)
    y = m(x)
    assert y.shape == x.shape and y.dtype == F64
    torch.testing.assert_close(y, by_hand(m, x), rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_on_cpu_keep_the_input_dtype() -> None:
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        m = layer(32, dtype=dtype)
        x = inputs(2, 20, 32, dtype=dtype)
        y = m(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), by_hand(m, x), rtol=tol, atol=tol)


def test_gqa_heads_of_a_group_share_b_and_c() -> None:
    m = layer(64, kv_heads=2)  # 4 heads, groups {0, 1} and {2, 3}
    A, Bg, C, V = m.project(inputs(2, 9, 64))
    assert A.shape == (2, 9, 4) and Bg.shape == C.shape == V.shape == (2, 9, 4, 16)
    for t in (Bg, C):
        assert torch.equal(t[..., 0, :], t[..., 1, :]) and torch.equal(t[..., 2, :], t[..., 3, :])
        assert not torch.allclose(t[..., 1, :], t[..., 2, :])
    assert not torch.allclose(V[..., 0, :], V[..., 1, :])  # V is per head


@pytest.mark.parametrize("decay_max", [0.8, 0.5, 1.0])
def test_gates_are_bounded(decay_max) -> None:
    m = layer(32, decay_max=decay_max)
    with torch.no_grad():
        m.in_proj.weight.mul_(50.0)  # saturate the sigmoid both ways
    A = m.project(inputs(4, 64, 32))[0]
    assert A.min() >= 0 and A.max() <= decay_max
    assert A.min() < 0.01 * decay_max and A.max() > 0.99 * decay_max


# --- streaming -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 16), (2, 32)])
@pytest.mark.parametrize("L1", [1, 15, 16, 17, 32, 40])
def test_prefill_then_steps_equal_full_forward(k, bl, L1) -> None:
    m = layer(32, kv_heads=1, window_blocks=k, block_len=bl)
    L = L1 + 2 * bl + 3
    x = inputs(3, L, 32, seed=L1)
    full = m(x)
    out, s = m(x[:, :L1], return_state=True)
    assert isinstance(s, SwrState) and s.positions() == [L1] * s.shape[0] and s.dtype == F64  # float64: exact
    outs = [out]
    for t in range(L1, L):
        o, s = m.step(x[:, t], s)
        outs.append(o[:, None])
    assert s.positions() == [L] * s.shape[0]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_chunks_with_state_equal_full_forward_float32() -> None:
    m = layer(32, dtype=torch.float32, kv_heads=2)
    x = inputs(2, 90, 32, dtype=torch.float32)
    full = m(x)
    s, outs = None, []
    for c0, c1 in ((0, 7), (7, 16), (16, 49), (49, 50), (50, 90)):
        o, s = m(x[:, c0:c1], state=s, return_state=True)
        outs.append(o)
    assert s.dtype == torch.float32 and s.positions() == [90] * s.shape[0]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=2e-5, atol=2e-5)
    s0 = m.init_state(2)
    o, _ = m(x[:, :10], state=s0, return_state=True)  # an explicit zero state is a fresh start
    torch.testing.assert_close(o, full[:, :10], rtol=2e-5, atol=2e-5)


def test_step_from_nothing_equals_forward() -> None:
    m = layer(32, dtype=torch.float32)
    x = inputs(2, 40, 32, dtype=torch.float32)
    s, outs = None, []
    for t in range(40):
        o, s = m.step(x[:, t], s)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), m(x), rtol=2e-5, atol=2e-5)


def test_forward_with_state_only_returns_output() -> None:
    m = layer(32)
    x = inputs(1, 30, 32)
    _, s = m(x[:, :10], return_state=True)
    y = m(x[:, 10:], state=s)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, m(x)[:, 10:], rtol=1e-10, atol=1e-10)


# --- packed sequences ------------------------------------------------------------------------------------------


def test_cu_seqlens_equals_each_sequence_alone_forward_and_backward() -> None:
    m = layer(32, kv_heads=1)
    lengths = [13, 40, 1, 22]
    cu = torch.tensor([0, 13, 53, 54, 76], dtype=torch.int32)
    x = inputs(1, 76, 32).requires_grad_()
    y = m(x, cu_seqlens=cu)
    dy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    (y * dy).sum().backward()
    gx, gw = x.grad.clone(), m.in_proj.weight.grad.clone()
    m.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    start, ys = 0, []
    for n in lengths:
        ys.append(m(x2[:, start : start + n]))
        start += n
    y2 = torch.cat(ys, dim=1)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, m.in_proj.weight.grad, rtol=1e-10, atol=1e-10)
    assert (y - m(x.detach())).abs().max() > 1e-6  # not the buffer as one sequence


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"dim": 40}, r"dim=40 is not divisible by head_dim=16; allowed: dim a multiple of head_dim"),
        ({"dim": 64, "kv_heads": 3}, r"kv_heads=3 does not divide heads=4; allowed kv_heads: \[1, 2, 4\]"),
        ({"dim": 64, "decay_max": 1.5}, r"decay_max must be a number in \(0, 1\]"),
        ({"dim": 64, "decay_max": 0}, r"decay_max"),
        ({"dim": 64, "window_blocks": 0}, "window_blocks must be an int >= 1"),
        ({"dim": 64, "head_dim": 0}, "head_dim must be an int >= 1"),
        ({"dim": 64, "heads": 2.5}, "heads must be an int >= 1"),
    ],
)
def test_bad_config(kw, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        Phalanx(**kw)


def test_bad_state_and_inputs() -> None:
    m = layer(32)  # heads 2, DH 16, k 2, BL 16
    x = inputs(2, 10, 32)
    with pytest.raises(ValueError, match=r"window_blocks=2.*window_blocks=3|window_blocks=3.*window_blocks=2"):
        m(x, state=SwrState.zeros(2, 2, 16, 3, dtype=F64))
    with pytest.raises(ValueError, match="block_len"):
        m(x, state=SwrState.zeros(2, 2, 16, 2, block_len=32, dtype=F64))
    with pytest.raises(ValueError, match=r"sequences=3.*\[N, H, DH\]"):
        m(inputs(3, 10, 32), state=m.init_state(2))
    with pytest.raises(ValueError, match=r"sequences=2.*\[N, H, DH\]"):  # packed: one state row per sequence
        m(x[:1], cu_seqlens=[0, 4, 10], state=m.init_state(3))
    with pytest.raises(ValueError, match=r"heads=2"):
        m.step(x[:, 0], SwrState.zeros(2, 4, 16, 2))
    with pytest.raises(TypeError, match="SwrState"):
        m(x, state=torch.zeros(2, 2, 16, 4))
    with pytest.raises(ValueError, match=r"\[B, L, dim=32\]"):
        m(inputs(2, 10, 16))
    with pytest.raises(ValueError, match=r"\[B, dim=32\]"):
        m.step(x)
    with pytest.raises(ValueError, match="packed along the tokens in batch 1"):
        m(x, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="end at"):
        m(x[:1], cu_seqlens=[0, 9])


# --- gradients ------------------------------------------------------------------------------------------------------


def test_backward_runs_and_grads_are_finite() -> None:
    m = layer(64, kv_heads=2, dtype=torch.float32, bias=True)
    x = inputs(2, 50, 64, dtype=torch.float32).requires_grad_()
    m(x).square().mean().backward()
    for name, p in [*m.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_backward_matches_formula() -> None:
    m = layer(32, kv_heads=1)
    x = inputs(2, 33, 32)
    dy = torch.randn(2, 33, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    g1 = torch.autograd.grad((m(x) * dy).sum(), list(m.parameters()))
    g2 = torch.autograd.grad((by_hand(m, x) * dy).sum(), list(m.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_backward_through_the_state_path() -> None:
    """Training with carried state (truncated BPTT style) differentiates like the full forward."""
    m = layer(32)
    x = inputs(1, 40, 32)
    y1, s = m(x[:, :18], return_state=True)
    y2 = m(x[:, 18:], state=s)
    g1 = torch.autograd.grad(torch.cat([y1, y2], 1).square().sum(), list(m.parameters()))
    g2 = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
