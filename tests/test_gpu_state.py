"""GPU tests of the SWR kernels with a streaming state and packed sequences (the ``*_state`` entry points):
chunked training equals one pass, per-sequence positions, packed sequences that each continue their own state,
the gradients of the old and the new state, against float64; bitwise-identical across tuning configs."""

from __future__ import annotations

import itertools

import pytest
import torch

import swrgen
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.state import SwrState, decode_step, final_state, swr_with_state
from tests.gpu_util import TUNING, make_inputs, random_state, rel_err, spec_for, torch_dtype

pytestmark = pytest.mark.gpu

NAN = float("nan")
K_BL = [(1, 16), (2, 16), (3, 16), (2, 32)]


def reference_with_state(a, x, k, bl, data, positions, dy, d_out):
    """float64 on the CPU: (y, new state data, da, dx, d state data) by swr_with_state and autograd."""
    a64 = a.detach().double().cpu().requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    d64 = data.detach().double().cpu().requires_grad_()
    y, new = swr_with_state(a64, x64, k, bl, SwrState(d64, positions, bl))
    loss = (y * dy.double().cpu()).sum() + (new.data * d_out.double().cpu()).sum()
    da, dx, dd = torch.autograd.grad(loss, (a64, x64, d64), allow_unused=True)  # k = 1 at a tile edge: no state
    return y.detach(), new.data.detach(), da, dx, torch.zeros_like(d64) if dd is None else dd


# --- chunked training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "bl"), K_BL)
@pytest.mark.parametrize("split", [1, 7, 8, 15, 16, 17, 100, 1024, 1031])
def test_chunked_training_equals_one_pass(k, bl, split):
    a, x = make_inputs(2, 3, 16, 2100, seed=split + 10 * k + bl)
    a.requires_grad_()
    x.requires_grad_()
    dy = torch.randn(x.shape, device="cuda")
    y1, st = swrgen.swr(a[..., :split], x[..., :split], window_blocks=k, block_len=bl, return_state=True)
    assert st.positions() == [split, split]
    y2 = swrgen.swr(a[..., split:], x[..., split:], window_blocks=k, block_len=bl, initial_state=st)
    y = torch.cat([y1, y2], dim=-1)
    ga, gx = torch.autograd.grad((y * dy).sum(), (a, x))
    a64, x64 = a.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    ref = swr_reference(a64, x64, k, bl)
    ra, rx = torch.autograd.grad((ref * dy.double()).sum(), (a64, x64))
    assert rel_err(y, ref) <= 2e-3
    assert rel_err(gx, rx) <= 5e-3 and rel_err(ga, ra) <= 5e-3
    # the one-pass kernels on the same inputs: the same math up to the state's fp32 rounding
    assert rel_err(y2, swrgen.swr(a.detach(), x.detach(), window_blocks=k, block_len=bl)[..., split:]) <= 1e-5


@pytest.mark.parametrize(("k", "bl"), K_BL)
@pytest.mark.parametrize("per_channel", [False, True])
def test_many_chunks_with_short_ones_chain(k, bl, per_channel):
    """Chunks shorter than a tile and than k tiles: their new state depends on the old one (a chain)."""
    L = 6 * bl + 9
    a, x = make_inputs(2, 2, 32, L, per_channel=per_channel, seed=k * 7 + bl)
    a.requires_grad_()
    x.requires_grad_()
    cuts = [0, 3, 3 + bl, 4 + bl, 9 + 2 * bl, 9 + 2 * bl + 1, L]
    ys, st = [], None
    for c0, c1 in itertools.pairwise(cuts):
        y, st = swrgen.swr(a[..., c0:c1], x[..., c0:c1], window_blocks=k, block_len=bl, initial_state=st,
                           return_state=True)  # fmt: skip
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    dy = torch.randn(y.shape, device="cuda")
    ga, gx = torch.autograd.grad((y * dy).sum(), (a, x))
    a64, x64 = a.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    ref = swr_reference(a64, x64, k, bl)
    ra, rx = torch.autograd.grad((ref * dy.double()).sum(), (a64, x64))
    assert rel_err(y, ref) <= 2e-3 and rel_err(gx, rx) <= 5e-3 and rel_err(ga, ra) <= 5e-3
    assert st.positions() == [L, L]


# --- the state's own gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "bl"), K_BL)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("length", [1, 5, 16, 40, 1000])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_state_in_and_out_gradients(k, bl, per_channel, length, dtype):
    positions = [0, 1, bl - 1, bl, 3 * bl + 5]
    n = len(positions)
    tol = 1e-4 if dtype == "fp32" else 5e-3  # fp32 inputs: the kernels' own fp32 rounding only
    a, x = make_inputs(n, 2, 16, length, per_channel=per_channel, seed=length + k + bl, dtype=torch_dtype(dtype))
    data = random_state(n, 2, 16, k, bl, positions, seed=length)
    dy = torch.randn(x.shape, device="cuda")
    d_out = torch.randn(data.shape, device="cuda")
    ry, rnew, ra, rx, rd = reference_with_state(a, x, k, bl, data, positions, dy, d_out)
    ks = swrgen.load(spec_for(k=k, bl=bl, per_channel=per_channel, dtype=dtype)).kernels
    pos = torch.tensor(positions, device="cuda")
    for phases in (None, tuple(p % bl for p in positions)):  # device positions only, or known on the host
        state = launch.StateArgs(data=data.float().cuda().contiguous(), pos=pos, phases=phases)
        y, new, new_pos = launch.forward(ks, a, x, state=state, want_state=True, poison=NAN)
        assert new_pos.tolist() == [p + length for p in positions]
        assert rel_err(y, ry) <= min(tol, 2e-3), "y"
        y_only, _, _ = launch.forward(ks, a, x, state=state, poison=NAN)  # continuing without the new state
        assert torch.equal(y_only, y)
        assert rel_err(new, rnew) <= 1e-4, "new state"
        dx, da, dd = launch.backward(ks, a, x, dy, state=state, d_state_out=d_out, want_d_state=True, poison=NAN)
        assert rel_err(dx, rx) <= tol, "dx"
        assert rel_err(da, ra) <= tol, "da"
        assert rel_err(dd, rd) <= tol, "d state"


def test_public_api_state_gradients():
    """Gradients reach the initial state and flow back from the returned one through swrgen.swr."""
    k, bl, positions, length = 2, 16, [5, 16, 33], 77
    a, x = make_inputs(3, 2, 16, length, seed=3)
    data = random_state(3, 2, 16, k, bl, positions, seed=3).float().cuda().requires_grad_()
    a.requires_grad_()
    x.requires_grad_()
    y, new = swrgen.swr(a, x, initial_state=SwrState(data, positions, bl), return_state=True)
    dy, d_out = torch.randn(y.shape, device="cuda"), torch.randn(new.data.shape, device="cuda")
    got = torch.autograd.grad((y * dy).sum() + (new.data * d_out).sum(), (a, x, data))
    ry, rnew, ra, rx, rd = reference_with_state(a, x, k, bl, data, positions, dy, d_out)
    assert rel_err(y, ry) <= 2e-3 and rel_err(new.data, rnew) <= 1e-4
    assert rel_err(got[0], ra) <= 5e-3 and rel_err(got[1], rx) <= 5e-3 and rel_err(got[2], rd) <= 5e-3


# --- packed sequences with states ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_packed_sequences_continue_their_own_states(k, aligned):
    bl = 16
    lens = [8, 1024, 16, 0, 40, 4096] if aligned else [0, 1, 15, 16, 17, 40, 1000]
    positions = [0, 8, 16, 24, 32, 8] if aligned else [0, 3, 16, 5, 31, 0, 17]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    a, x = make_inputs(1, 3, 16, cu[-1], seed=k + 100 * aligned)
    data = random_state(len(lens), 3, 16, k, bl, positions, seed=k)
    d_out = torch.randn(data.shape, device="cuda")
    dy = torch.randn(x.shape, device="cuda")
    st = SwrState(data.float().cuda().requires_grad_(), positions, bl)
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    y, new = swrgen.swr(ag, xg, window_blocks=k, cu_seqlens=cu, initial_state=st, return_state=True)
    assert new.positions() == [p + n for p, n in zip(positions, lens, strict=True)]
    assert new.pos.tolist() == new.positions()
    ga, gx, gd = torch.autograd.grad((y * dy).sum() + (new.data * d_out).sum(), (ag, xg, st.data))
    for i, (s, e) in enumerate(itertools.pairwise(cu)):
        if e == s:  # an empty sequence: its state goes through (the carriers; w, g at a tile edge)
            torch.testing.assert_close(new.data[i, ..., 2:], st.data[i, ..., 2:])
            continue
        ry, rnew, ra, rx, rd = reference_with_state(a[..., s:e], x[..., s:e], k, bl, data[i : i + 1], [positions[i]],
                                                    dy[..., s:e], d_out[i : i + 1])  # fmt: skip
        assert rel_err(y[..., s:e], ry) <= 2e-3, f"sequence {i}"
        assert rel_err(new.data[i : i + 1], rnew) <= 1e-4, f"sequence {i}"
        assert rel_err(gx[..., s:e], rx) <= 5e-3 and rel_err(ga[..., s:e], ra) <= 5e-3, f"sequence {i}"
        assert rel_err(gd[i : i + 1], rd) <= 5e-3, f"sequence {i}"


def test_cu_seqlens_on_the_device_and_bad_ones():
    a, x = make_inputs(1, 2, 16, 100, seed=1)
    y = swrgen.swr(a, x, cu_seqlens=torch.tensor([0, 30, 100], device="cuda", dtype=torch.int32))
    assert rel_err(y[..., 30:], swr_reference(a[..., 30:].double(), x[..., 30:].double(), 2, 16)) <= 2e-3
    with pytest.raises(ValueError, match="non-decreasing"):
        swrgen.swr(a, x, cu_seqlens=torch.tensor([0, 60, 30, 100], device="cuda"))
    with pytest.raises(ValueError, match="end at the packed length"):
        swrgen.swr(a, x, cu_seqlens=[0, 30, 99])
    with pytest.raises(TypeError, match="integer"):
        swrgen.swr(a, x, cu_seqlens=torch.tensor([0.0, 30.0, 100.0]))
    with pytest.raises(ValueError, match="N, H, DH"):
        swrgen.swr(a, x, cu_seqlens=[0, 30, 100], initial_state=SwrState.zeros(3, 2, 16, 2, "cuda"))


# --- tuning never changes results ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(("positions", "vec_bwd"), [([0, 8, 24, 40], "swr_bwd_state_vec"),
                                                    ([0, 32, 16, 48], "swr_bwd_state_aligned_vec")])  # fmt: skip
def test_state_kernels_identical_across_tuning(k, positions, vec_bwd):
    """Every tuning config and the scalar kernels (phases unknown) give the same bits; at tile edges the vector
    backward is the one that reads no phase."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cluster configs need sm_90")
    bl, length = 16, 3000
    a, x = make_inputs(4, 3, 16, length, seed=k)
    data = random_state(4, 3, 16, k, bl, positions, seed=k).float().cuda()
    pos = torch.tensor(positions, device="cuda")
    dy = torch.randn(x.shape, device="cuda")
    d_out = torch.randn(data.shape, device="cuda")
    base = spec_for(k=k)
    outs = []
    for spec in [base] + [base.replace_target(**kw) for kw in TUNING]:
        ks = swrgen.load(spec).kernels
        for phases in (tuple(p % bl for p in positions), None):  # vector kernels where the host knows phases
            state = launch.StateArgs(data=data, pos=pos, phases=phases)
            y, new, _ = launch.forward(ks, a, x, state=state, want_state=True, poison=NAN)
            dx, da, dd = launch.backward(ks, a, x, dy, state=state, d_state_out=d_out, want_d_state=True, poison=NAN)
            outs.append((spec.target, (y, new, dx, da, dd)))
            want = vec_bwd if phases is not None else "swr_bwd_state_scalar"
            assert launch.backward_plan(ks, a, x, dy, None, state, True).kernel.name == want
    ry, _rnew, ra, rx, rd = reference_with_state(a, x, k, bl, data, positions, dy, d_out)
    y, _new, dx, da, dd = outs[0][1]  # the vector kernels at the spec's target
    assert rel_err(y, ry) <= 2e-3 and rel_err(dd, rd) <= 5e-3
    assert rel_err(dx, rx) <= 5e-3 and rel_err(da, ra) <= 5e-3
    for target, got in outs[1:]:
        for name, u, v in zip(("y", "new state", "dx", "da", "dstate"), got, outs[0][1], strict=True):
            assert torch.equal(u, v), f"{name} changed with tuning {target}"


# --- decoding ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "bl"), [(1, 16), (2, 16), (3, 32)])
def test_kernel_state_continues_on_the_cpu_and_by_decode(k, bl):
    L = 3 * bl + 5
    a, x = make_inputs(2, 2, 16, L, seed=4, dtype=torch.float32)
    ref = swr_reference(a.double(), x.double(), k, bl)
    y1, s = swrgen.swr(a[..., :20], x[..., :20], window_blocks=k, block_len=bl, return_state=True)
    assert s.device.type == "cuda"
    torch.cuda.set_sync_debug_mode("error")  # decode_step must never synchronise with the host
    try:
        ys = []
        for t in range(20, L):
            y_t, s = decode_step(a[..., t], x[..., t], s, k, bl)
            ys.append(y_t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(torch.cat([y1, torch.stack(ys, -1)], -1).double(), ref.cuda(), rtol=1e-4, atol=1e-4)
    fs = final_state(a.double().cpu(), x.double().cpu(), k, bl)
    torch.testing.assert_close(s.data.double().cpu(), fs.data.double(), rtol=1e-4, atol=1e-4)


def test_one_graph_of_decode_step_serves_every_position():
    k, bl = 2, 16
    positions = [0, 5, 15, 31]  # the next token completes a tile for two of them
    a, x = make_inputs(4, 2, 16, 40, seed=6, dtype=torch.float32)
    data = random_state(4, 2, 16, k, bl, positions, seed=6).float().cuda()
    static = SwrState(data.clone(), torch.tensor(positions, device="cuda"), bl)
    a_in, x_in = a[..., 0].clone(), x[..., 0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(a_in, x_in, static, k, bl)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_out, s_out = decode_step(a_in, x_in, static, k, bl)
    eager = SwrState(data.clone(), torch.tensor(positions, device="cuda"), bl)
    for t in range(20):  # the same graph at every position, tile edges included
        a_in.copy_(a[..., t])
        x_in.copy_(x[..., t])
        graph.replay()
        y_e, eager = decode_step(a[..., t], x[..., t], eager, k, bl)
        torch.testing.assert_close(y_out, y_e, rtol=0, atol=0)
        torch.testing.assert_close(s_out.data, eager.data, rtol=0, atol=0)
        static.data.copy_(s_out.data)
        static.pos.copy_(s_out.pos)


def test_float64_on_cuda_is_rejected():
    a, x = make_inputs(1, 2, 16, 20, seed=0)
    with pytest.raises(TypeError, match="float64 runs on the CPU only"):
        swrgen.swr(a.double(), x.double())
