"""Streaming state of the SWR (swrgen/ops/swr/state.py): prefill + continuation == one shot, final_state ==
the state built token by token, decode_step == one shot, the packed layout, and the error cases. CPU (the CUDA
checks are in tests/test_gpu_state.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.state import SwrState, decode_step, final_state, swr_with_state

F64 = torch.float64
B, H, DH = 2, 2, 4
WINDOWS = [(1, 16), (2, 16), (3, 16), (2, 32), (3, 32), (4, 8)]


def make(L: int, per_channel: bool, seed: int = 0, gates: str = "unit", dims=(B, H, DH)):
    g = torch.Generator().manual_seed(seed)
    b, h, dh = dims
    a_shape = (b, h, dh, L) if per_channel else (b, h, L)
    if gates == "unit":
        a = 0.3 + 0.69 * torch.rand(a_shape, generator=g, dtype=F64)
    else:  # zeros, negatives and > 1
        a = torch.empty(a_shape, dtype=F64).uniform_(-1.3, 1.3, generator=g)
        a = torch.where(torch.rand(a_shape, generator=g, dtype=F64) < 0.1, torch.zeros((), dtype=F64), a)
    x = torch.randn(b, h, dh, L, generator=g, dtype=F64)
    return a, x


def zeros(k: int, bl: int, dtype=F64, dims=(B, H, DH)) -> SwrState:
    return SwrState.zeros(*dims, k, block_len=bl, dtype=dtype)


def split_points(bl: int, L: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    pts = {1, bl - 1, bl, bl + 1, 2 * bl, 2 * bl - 1, 3 * bl + 1, L - 1, rng.randrange(1, L), rng.randrange(1, L)}
    return sorted(p for p in pts if 0 < p < L)


def step_through(a, x, state, k, bl):
    ys = []
    for t in range(x.shape[-1]):
        y, state = decode_step(a[..., t], x[..., t], state, k, bl)
        ys.append(y)
    return torch.stack(ys, dim=-1), state


def assert_state_close(s1: SwrState, s2: SwrState, tol: float) -> None:
    assert s1.positions() == s2.positions() and s1.block_len == s2.block_len
    assert s1.window_blocks == s2.window_blocks
    torch.testing.assert_close(s1.packed().double(), s2.packed().double(), rtol=tol, atol=tol)


def at(state: SwrState, pos: int) -> bool:
    """Every sequence of the state has seen ``pos`` tokens (on the device and in the host hint)."""
    return state.pos.tolist() == [pos] * state.shape[0] and state.positions() == [pos] * state.shape[0]


# --- prefill L1 + continuation L2 == one shot ------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), WINDOWS)
def test_prefill_then_continue_equals_one_shot(k, bl, per_channel) -> None:
    L = 4 * bl + 7
    a, x = make(L, per_channel, seed=k * 100 + bl)
    ref = swr_reference(a, x, k, bl)
    for L1 in split_points(bl, L, seed=k + bl):
        y1, s = swr_with_state(a[..., :L1], x[..., :L1], k, bl, zeros(k, bl))
        assert at(s, L1) and s.window_blocks == k
        y2, s2 = swr_with_state(a[..., L1:], x[..., L1:], k, bl, s)
        assert y1.dtype == F64 and y2.shape == (B, H, DH, L - L1)
        torch.testing.assert_close(torch.cat([y1, y2], dim=-1), ref, rtol=1e-12, atol=1e-12, msg=f"L1={L1}")
        assert at(s2, L)


@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 16), (2, 32)])
def test_float32_state_continuation(k, bl) -> None:
    """The default (float32, what the GPU uses) state: equal to fp32 precision."""
    L = 3 * bl + 5
    a, x = make(L, False, seed=7)
    ref = swr_reference(a, x, k, bl)
    for L1 in (bl - 1, bl, bl + 1, 2 * bl + 3):
        y1, s = swr_with_state(a[..., :L1], x[..., :L1], k, bl)  # state=None: float32 state
        assert s.dtype == torch.float32
        y2, _ = swr_with_state(a[..., L1:], x[..., L1:], k, bl, s)
        torch.testing.assert_close(torch.cat([y1, y2], dim=-1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "bl"), WINDOWS)
def test_many_chunks_and_mixed_gates(k, bl) -> None:
    """Random chunk lengths (including 1 and tile-crossing ones), zero/negative/>1 gates."""
    L = 5 * bl + 3
    for per_channel in (False, True):
        a, x = make(L, per_channel, seed=3, gates="mixed")
        ref = swr_reference(a, x, k, bl)
        rng = random.Random(k * bl)
        cuts = sorted({0, L, *(rng.randrange(1, L) for _ in range(6)), 1, bl})
        s, ys = None, []
        for c0, c1 in itertools.pairwise(cuts):
            y, s = swr_with_state(a[..., c0:c1], x[..., c0:c1], k, bl, s if s is not None else zeros(k, bl))
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, dim=-1), ref, rtol=1e-10, atol=1e-10)


def test_state_none_is_the_plain_swr() -> None:
    for per_channel in (False, True):
        a, x = make(45, per_channel)
        y, s = swr_with_state(a, x, 2, 16)
        torch.testing.assert_close(y, swr_reference(a, x, 2, 16), rtol=0, atol=1e-13)
        assert at(s, 45)


def test_continuation_is_not_a_fresh_start() -> None:
    """The state matters: continuing from the prefill differs from starting the chunk from zero."""
    a, x = make(40, False)
    _, s = swr_with_state(a[..., :20], x[..., :20], 2, 16, zeros(2, 16))
    y_cont, _ = swr_with_state(a[..., 20:], x[..., 20:], 2, 16, s)
    y_fresh = swr_reference(a[..., 20:], x[..., 20:], 2, 16)
    assert (y_cont - y_fresh).abs().max() > 1e-3


def test_gradients_through_the_state_equal_one_shot() -> None:
    """Gradients of prefill + continuation w.r.t. every token equal those of the one-shot reference."""
    k, bl, L, L1 = 2, 16, 50, 21
    for per_channel in (False, True):
        a, x = make(L, per_channel, seed=5)
        dy = torch.randn(B, H, DH, L, dtype=F64, generator=torch.Generator().manual_seed(1))
        a1, x1 = a.clone().requires_grad_(), x.clone().requires_grad_()
        y1, s = swr_with_state(a1[..., :L1], x1[..., :L1], k, bl, zeros(k, bl))
        y2, _ = swr_with_state(a1[..., L1:], x1[..., L1:], k, bl, s)
        ga, gx = torch.autograd.grad((torch.cat([y1, y2], -1) * dy).sum(), (a1, x1))
        a2, x2 = a.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rx = torch.autograd.grad((swr_reference(a2, x2, k, bl) * dy).sum(), (a2, x2))
        torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)


# --- final_state -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), WINDOWS)
def test_final_state_equals_decode_steps(k, bl, per_channel) -> None:
    L = 3 * bl + 9
    a, x = make(L, per_channel, seed=11, gates="mixed")
    for L1 in (0, 1, bl - 1, bl, bl + 5):  # from a fresh state and from mid-sequence states
        s0 = zeros(k, bl)
        if L1:
            _, s0 = step_through(a[..., :L1], x[..., :L1], s0, k, bl)
        for L2 in sorted({1, bl - 1 - L1 % bl or 1, bl, (k + 1) * bl + 1, L - L1}):
            L2 = min(L2, L - L1)
            fs = final_state(a[..., L1 : L1 + L2], x[..., L1 : L1 + L2], k, bl, s0)
            _, ss = step_through(a[..., L1 : L1 + L2], x[..., L1 : L1 + L2], s0, k, bl)
            assert_state_close(fs, ss, 1e-11)
            assert at(fs, L1 + L2)


@pytest.mark.parametrize(("k", "bl"), WINDOWS)
def test_final_state_reads_only_the_last_tiles(k, bl) -> None:
    """Tokens more than k tiles before the end cannot change the state: NaN there must not leak in."""
    L = 8 * bl + 5
    a, x = make(L, False, seed=2)
    fs = final_state(a, x, k, bl)
    dead = (L // bl - (k - 1)) * bl  # tokens [0, dead) lie before the oldest tile the state keeps
    a2, x2 = a.clone(), x.clone()
    a2[..., :dead] = float("nan")
    x2[..., :dead] = float("nan")
    fs2 = final_state(a2, x2, k, bl)
    assert torch.isfinite(fs2.packed()).all()
    assert_state_close(fs, fs2, 0)
    x3 = x.clone()
    x3[..., min(dead + bl - 1, L - 1)] += 1.0  # the oldest kept tile (k = 1: the partial tile) does matter
    assert (final_state(a, x3, k, bl).packed() - fs.packed()).abs().max() > 1e-6


def test_final_state_layout_and_zero_state() -> None:
    s = SwrState.zeros(B, H, DH, 3, block_len=16)
    assert at(s, 0) and s.window_blocks == 3 and s.shape == (B, H, DH) and s.pos.dtype == torch.int64
    assert s.dtype == torch.float32 and s.carry_v.shape == (B, H, DH, 2)
    assert (s.w == 0).all() and (s.g == 1).all() and (s.carry_v == 0).all() and (s.carry_p == 0).all()
    a, x = make(37, False)
    fs = final_state(a, x, 3, 16)  # 2 complete tiles + 5 tokens
    p = fs.packed()
    assert p.shape == (B, H, DH, 2 + 2 * 2) and p.dtype == torch.float32 and p.is_contiguous()
    torch.testing.assert_close(p[..., 0], fs.w)
    torch.testing.assert_close(p[..., 1], fs.g)
    torch.testing.assert_close(p[..., 2:4], fs.carry_v)
    torch.testing.assert_close(p[..., 4:6], fs.carry_p)
    # Values from the definition: v_1 = local state at the end of tile 1, p_1 its gate product, etc.
    a4 = a.unsqueeze(2).expand(B, H, DH, 37)

    def local(lo, hi):
        w = torch.zeros(B, H, DH, dtype=F64)
        for t in range(lo, hi):
            w = a4[..., t] * w + x[..., t]
        return w, a4[..., lo:hi].prod(-1)

    for col, (lo, hi) in ((0, (32, 37)), (2, (16, 32)), (3, (0, 16))):
        w, g = local(lo, hi)
        if col == 0:
            torch.testing.assert_close(fs.w.double(), w, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fs.g.double(), g, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(fs.carry_v[..., col - 2].double(), w, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fs.carry_p[..., col - 2].double(), g, rtol=1e-6, atol=1e-6)
    back = SwrState(p, fs.pos, 16)
    assert_state_close(back, fs, 0)
    c = fs.clone()
    c.w.add_(1.0)
    assert not torch.equal(c.w, fs.w)  # clone owns its tensors


def test_tile_boundary_state_is_reset() -> None:
    a, x = make(32, False)
    fs = final_state(a, x, 2, 16)
    assert at(fs, 32) and (fs.w == 0).all() and (fs.g == 1).all()


# --- decode_step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), WINDOWS)
def test_decode_steps_equal_one_shot(k, bl, per_channel) -> None:
    L = 3 * bl + 2
    a, x = make(L, per_channel, seed=k)
    ref = swr_reference(a, x, k, bl)
    y, s = step_through(a, x, zeros(k, bl), k, bl)  # float64 state: exact
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert at(s, L)
    y32, s32 = step_through(a.float(), x.float(), zeros(k, bl, torch.float32), k, bl)  # the float32 state
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 32)])
def test_prefill_then_decode_equals_one_shot(k, bl) -> None:
    L = 3 * bl + 4
    a, x = make(L, False, seed=9)
    ref = swr_reference(a, x, k, bl)
    for L1 in (1, bl - 1, bl, bl + 1, 2 * bl):
        y1, s = swr_with_state(a[..., :L1], x[..., :L1], k, bl)  # float32 state, like the layer
        y2, _ = step_through(a[..., L1:].float(), x[..., L1:].float(), s, k, bl)
        torch.testing.assert_close(torch.cat([y1, y2.double()], -1), ref, rtol=1e-5, atol=1e-5)


def test_decode_step_accepts_bf16_inputs() -> None:
    a, x = make(20, False)
    ab, xb = a.bfloat16(), x.bfloat16()
    y, _ = step_through(ab, xb, zeros(2, 16, torch.float32), 2, 16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), swr_reference(ab, xb, 2, 16), rtol=1e-5, atol=1e-5)


# --- errors --------------------------------------------------------------------------------------------------


def test_wrong_window_or_shape_is_rejected() -> None:
    a, x = make(20, False)
    s2 = zeros(2, 16)
    with pytest.raises(ValueError, match=r"window_blocks=2.*window_blocks=3"):
        swr_with_state(a, x, 3, 16, s2)
    with pytest.raises(ValueError, match=r"block_len=16.*block_len=32"):
        final_state(a, x, 2, 32, s2)
    with pytest.raises(ValueError, match=r"\[N, H, DH\]"):
        swr_with_state(a, x, 2, 16, zeros(2, 16, dims=(B + 1, H, DH)))
    with pytest.raises(ValueError, match=r"window_blocks=2.*window_blocks=1"):
        decode_step(a[..., 0], x[..., 0], s2, 1, 16)
    with pytest.raises(ValueError, match="a_t must be"):
        decode_step(a[..., 0, None], x[..., 0], s2, 2, 16)
    with pytest.raises(ValueError, match="x_t must be"):
        decode_step(a[..., 0], x, s2, 2, 16)
    with pytest.raises(TypeError, match="SwrState"):
        decode_step(a[..., 0], x[..., 0], None, 2, 16)
    with pytest.raises(TypeError, match="SwrState"):
        swr_with_state(a, x, 2, 16, s2.packed())
    with pytest.raises(ValueError, match="gates must be"):
        swr_with_state(a[..., None], x, 2, 16)


def test_malformed_states_are_rejected() -> None:
    s = zeros(3, 16)
    with pytest.raises(ValueError, match="pos"):
        SwrState.from_parts(-1, s.carry_v, s.carry_p, s.w, s.g, 16)
    with pytest.raises(ValueError, match="block_len"):
        SwrState.from_parts(0, s.carry_v, s.carry_p, s.w, s.g, 0)
    with pytest.raises(ValueError, match="carry_p"):
        SwrState.from_parts(0, s.carry_v, s.carry_p[..., :1], s.w, s.g, 16)
    with pytest.raises(ValueError, match="carry_v"):
        SwrState.from_parts(0, s.carry_v[:1], s.carry_p, s.w, s.g, 16)
    with pytest.raises(ValueError, match="g must"):
        SwrState.from_parts(0, s.carry_v, s.carry_p, s.w, s.g[..., :1], 16)
    with pytest.raises(ValueError, match="window_blocks"):
        SwrState.zeros(B, H, DH, 0)
    with pytest.raises(ValueError, match=r"\[N, H, DH, 2 \+ 2\(k-1\)\]"):
        SwrState(torch.zeros(B, H, DH, 3), 0, 16)
    with pytest.raises(ValueError, match=r"int64 \[N\]"):
        SwrState(s.data, torch.zeros(B + 1, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match=r"int64 \[N\]"):
        SwrState(s.data, torch.zeros(B), 16)
    with pytest.raises(ValueError, match="multiple of block_len"):
        SwrState.zeros(B, H, DH, 2, pos=5)
    with pytest.raises(TypeError, match="floating"):
        SwrState(torch.zeros(B, H, DH, 4, dtype=torch.int32), 0, 16)


# --- per-sequence positions --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 16), (4, 8)])
def test_sequences_at_different_positions_continue_alone(k, bl, per_channel) -> None:
    """One call continues every batch entry from its own position: each equals running it alone."""
    L1s = [0, 1, bl - 1, bl, bl + 3]
    L = 2 * bl + 5
    dims = (len(L1s), H, DH)
    a, x = make(max(L1s) + L, per_channel, seed=k * 31 + bl, gates="mixed", dims=dims)
    ref = swr_reference(a, x, k, bl)
    parts, ins, xs = [], [], []
    for b, L1 in enumerate(L1s):
        sb = zeros(k, bl, dims=(1, H, DH))  # float64: exact
        if L1:
            _, sb = swr_with_state(a[b : b + 1, ..., :L1], x[b : b + 1, ..., :L1], k, bl, sb)
        parts.append(sb)
        ins.append(a[b, ..., L1 : L1 + L])
        xs.append(x[b, ..., L1 : L1 + L])
    state = SwrState(torch.cat([p.data for p in parts]), [p.positions()[0] for p in parts], bl)
    y, s2 = swr_with_state(torch.stack(ins), torch.stack(xs), k, bl, state)
    for b, L1 in enumerate(L1s):
        torch.testing.assert_close(y[b], ref[b, ..., L1 : L1 + L], rtol=1e-11, atol=1e-11, msg=f"entry {b}")
    assert s2.positions() == [L1 + L for L1 in L1s]
    # decode_step with the batch at five different positions: one more token each, one call.
    idx = torch.tensor([L1 + L for L1 in L1s])
    if int(idx.max()) < ref.shape[-1]:
        a_t = torch.stack([a[b, ..., int(t)] for b, t in enumerate(idx)])
        x_t = torch.stack([x[b, ..., int(t)] for b, t in enumerate(idx)])
        y_t, _ = decode_step(a_t, x_t, s2, k, bl)
        torch.testing.assert_close(y_t, torch.stack([ref[b, ..., int(t)] for b, t in enumerate(idx)]), rtol=1e-11,
                                   atol=1e-11)  # fmt: skip
