"""GPU tests of the fused Phalanx kernels with packed sequences and a streaming state, the decode kernel over
state slots, and the layer on every CUDA path (plain, packed, state, chunked training), against float64."""

from __future__ import annotations

import itertools

import pytest
import torch

import swrgen
from swrgen.nn import Phalanx
from swrgen.ops.phalanx import GatingLayout, launch, phalanx_decode
from swrgen.ops.phalanx.reference import phalanx_gating_reference, split_projections
from swrgen.ops.swr.launch import Sequences, StateArgs
from swrgen.ops.swr.state import SwrState, swr_with_state
from tests.gpu_util import TUNING, random_state, rel_err
from tests.gpu_util import fused_spec_for as fused_spec

pytestmark = pytest.mark.gpu

NAN = float("nan")
DM = 0.8


def projections(batch, length, layout, seed, dtype=torch.bfloat16):
    """Fresh random projections (never zeros): gate logits ~ N(0, 2), the rest ~ N(0, 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = torch.randn(batch, length, layout.width, generator=g)
    P[..., : layout.heads] *= 2
    return P.to(device="cuda", dtype=dtype)


def gated_reference(P, layout, k, bl, data, positions, dZ, d_out):
    """float64 on the CPU: (Z, new state data, dP, d state data) by the reference gates + swr_with_state."""
    P64 = P.detach().double().cpu().requires_grad_()
    d64 = data.detach().double().cpu().requires_grad_()
    pa, pb, pc, pv = split_projections(P64, layout)
    a = (DM * torch.sigmoid(pa)).transpose(1, 2)
    u = (torch.sigmoid(pb) * pv).permute(0, 2, 3, 1)
    y, new = swr_with_state(a, u, k, bl, SwrState(d64, positions, bl))
    Z = (y.permute(0, 3, 1, 2) * pc + pv).reshape(*P.shape[:-1], layout.inner)
    loss = (Z * dZ.double().cpu()).sum() + (new.data * d_out.double().cpu()).sum()
    dP, dd = torch.autograd.grad(loss, (P64, d64), allow_unused=True)  # k = 1 at a tile edge: no state
    return Z.detach(), new.data.detach(), dP, torch.zeros_like(d64) if dd is None else dd


def check_blocks(dP, rdP, layout, tol):
    assert rel_err(dP, rdP) <= tol, "dP"
    for name, lo, n in zip("ABCV", (layout.col_a, layout.col_b, layout.col_c, layout.col_v), layout.split, strict=True):
        assert rel_err(dP[..., lo : lo + n], rdP[..., lo : lo + n]) <= 2 * tol, f"dP_{name}"


# --- packed sequences ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("lens", [[1, 15, 16, 17, 1000, 0, 33], [8192, 16, 4096]], ids=["edges", "long"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_packed_equals_each_sequence_alone(k, lens, kv_heads):
    layout = GatingLayout(8, kv_heads, 16)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    P = projections(1, cu[-1], layout, seed=k + sum(lens))
    dZ = torch.randn(1, cu[-1], layout.inner, device="cuda", dtype=torch.bfloat16)
    ks = swrgen.load(fused_spec(k=k)).kernels
    seqs = Sequences(cu)
    Z, _, _ = launch.forward(ks, P, layout, DM, seqs=seqs, poison=NAN)
    dP, _ = launch.backward(ks, P, dZ, layout, DM, seqs=seqs, poison=NAN)
    for s, e in itertools.pairwise(cu):
        if e == s:
            continue
        P64 = P[:, s:e].double().requires_grad_()
        rZ = phalanx_gating_reference(P64, layout, k, 16, DM)
        (rdP,) = torch.autograd.grad(rZ, P64, dZ[:, s:e].double())
        assert rel_err(Z[:, s:e], rZ.detach()) <= 1e-2, f"sequence [{s}, {e})"
        check_blocks(dP[:, s:e], rdP, layout, 1e-2)
        alone, _, _ = launch.forward(ks, P[:, s:e].contiguous(), layout, DM)
        assert torch.equal(alone, Z[:, s:e]), f"packed != alone for [{s}, {e})"


@pytest.mark.parametrize("tiles_per_warp", [3, 100])
def test_packed_under_a_tuned_tiles_per_warp(tuned_cache, tiles_per_warp):
    """A tuned variant whose tiles_per_warp is not the spec's serves a packed batch: every tile of every
    sequence is written (outputs poisoned first), the bits are the spec's own config's, and they match the
    float64 reference."""
    from swrgen.tune import store

    layout, cu = GatingLayout(8, 2, 16), [0, 17, 1017, 1018, 4018]
    P = projections(1, cu[-1], layout, seed=tiles_per_warp)
    dZ = torch.randn(1, cu[-1], layout.inner, device="cuda", dtype=torch.bfloat16)
    ks = swrgen.load(fused_spec(k=2)).kernels
    dev, seqs = ks.on(P.get_device()), Sequences(cu)
    shape = launch.tuning_shape(P, layout, seqs)
    store.save(ks.spec, dev.arch, shape, {"target": {"tiles_per_warp": tiles_per_warp}}, device=dev.card)
    assert ks.for_shape(dev.index, shape, "fwd").spec.target.tiles_per_warp == tiles_per_warp
    assert tiles_per_warp != ks.spec.target.tiles_per_warp
    Z, _, _ = launch.forward(ks, P, layout, DM, seqs=seqs, poison=NAN)
    dP, _ = launch.backward(ks, P, dZ, layout, DM, seqs=seqs, poison=NAN)
    with store.disabled():  # the spec's own tiles_per_warp: tuning never changes a bit
        assert torch.equal(launch.forward(ks, P, layout, DM, seqs=seqs)[0], Z)
        assert torch.equal(launch.backward(ks, P, dZ, layout, DM, seqs=seqs)[0], dP)
    for s, e in itertools.pairwise(cu):
        P64 = P[:, s:e].double().requires_grad_()
        rZ = phalanx_gating_reference(P64, layout, 2, 16, DM)
        (rdP,) = torch.autograd.grad(rZ, P64, dZ[:, s:e].double())
        assert rel_err(Z[:, s:e], rZ.detach()) <= 1e-2, f"sequence [{s}, {e})"
        check_blocks(dP[:, s:e], rdP, layout, 1e-2)


# --- states -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 5, 16, 40, 2000])
@pytest.mark.parametrize(("dtype", "heads", "kv_heads"), [("bf16", 4, 2), ("bf16", 8, 8), ("fp32", 4, 2),
                                                          ("fp32", 4, 4)])  # fmt: skip
def test_state_in_and_out_gradients(k, length, dtype, heads, kv_heads):
    bl, positions = 16, [0, 1, 15, 16, 53]
    layout = GatingLayout(heads, kv_heads, 16)
    tol = 1e-4 if dtype == "fp32" else 1e-2  # fp32 projections: the kernels' fp32 math (and fast sigmoid) only
    torch_dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    P = projections(len(positions), length, layout, seed=length + k, dtype=torch_dt)
    data = random_state(len(positions), heads, 16, k, bl, positions, seed=length)
    dZ = torch.randn(len(positions), length, layout.inner, device="cuda", dtype=torch_dt)
    d_out = torch.randn(data.shape, device="cuda")
    rZ, rnew, rdP, rd = gated_reference(P, layout, k, bl, data, positions, dZ, d_out)
    ks = swrgen.load(fused_spec(k=k, dtype=dtype)).kernels
    state = StateArgs(data=data.float().cuda().contiguous(), pos=torch.tensor(positions, device="cuda"))
    Z, new, new_pos = launch.forward(ks, P, layout, DM, state=state, want_state=True, poison=NAN)
    assert new_pos.tolist() == [p + length for p in positions]
    assert rel_err(Z, rZ) <= tol, "Z"
    Z_only, _, _ = launch.forward(ks, P, layout, DM, state=state, poison=NAN)  # continuing without the new state
    assert torch.equal(Z_only, Z)
    assert rel_err(new, rnew) <= min(tol, 2e-3), "new state"
    dP, dd = launch.backward(ks, P, dZ, layout, DM, state=state, d_state_out=d_out, want_d_state=True, poison=NAN)
    check_blocks(dP, rdP, layout, tol)
    assert rel_err(dd, rd) <= tol, "d state"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_packed_sequences_with_states(k):
    bl, lens, positions = 16, [0, 1, 15, 16, 17, 40, 1000], [16, 3, 16, 5, 31, 0, 17]
    layout = GatingLayout(4, 4, 16)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    P = projections(1, cu[-1], layout, seed=k)
    data = random_state(len(lens), 4, 16, k, bl, positions, seed=k)
    st = SwrState(data.float().cuda().requires_grad_(), positions, bl)
    dZ = torch.randn(1, cu[-1], layout.inner, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(data.shape, device="cuda")
    Pg = P.clone().requires_grad_()
    Z, new = swrgen.phalanx_gating(Pg, heads=4, window_blocks=k, cu_seqlens=cu, initial_state=st, return_state=True)
    dP, dd = torch.autograd.grad((Z * dZ).sum() + (new.data * d_out).sum(), (Pg, st.data))
    for i, (s, e) in enumerate(itertools.pairwise(cu)):
        if e == s:
            torch.testing.assert_close(new.data[i, ..., 2:], st.data[i, ..., 2:])
            continue
        rZ, rnew, rdP, rd = gated_reference(P[:, s:e], layout, k, bl, data[i : i + 1], [positions[i]], dZ[:, s:e],
                                            d_out[i : i + 1])  # fmt: skip
        assert rel_err(Z[:, s:e], rZ) <= 1e-2 and rel_err(new.data[i : i + 1], rnew) <= 2e-3, f"sequence {i}"
        check_blocks(dP[:, s:e], rdP, layout, 1e-2)
        assert rel_err(dd[i : i + 1], rd) <= 1e-2, f"sequence {i}"


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("knobs", [{}, dict(persistent=True, tiles_per_warp=128, tiles_in_flight=2, warps_per_cta=2)],
                         ids=["spec", "h200"])  # fmt: skip
def test_state_backward_at_tiles_reads_no_phase(k, knobs):
    """Every sequence at a tile with the phases known: the aligned state backward, against float64 and bitwise
    equal to the one that reads the phases (the same call with the phases unknown)."""
    bl, positions, length = 16, [0, 32, 16, 48], 1000
    layout = GatingLayout(8, 4, 16)
    P = projections(len(positions), length, layout, seed=k)
    data = random_state(len(positions), 8, 16, k, bl, positions, seed=k)
    dZ = torch.randn(len(positions), length, layout.inner, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(data.shape, device="cuda")
    _rZ, _rnew, rdP, rd = gated_reference(P, layout, k, bl, data, positions, dZ, d_out)
    ks = swrgen.load(fused_spec(k=k, **knobs)).kernels
    pos = torch.tensor(positions, device="cuda")
    got = []
    for phases, kernel in (((0,) * len(positions), "phalanx_bwd_state_aligned_vec"), (None, "phalanx_bwd_state_vec")):
        state = StateArgs(data=data.float().cuda().contiguous(), pos=pos, phases=phases)
        got.append(launch.backward(ks, P, dZ, layout, DM, state=state, d_state_out=d_out, want_d_state=True,
                                   poison=NAN))  # fmt: skip
        assert launch.backward_plan(ks, P, dZ, layout, DM, None, True, state).kernel.name == kernel
    dP, dd = got[0]
    check_blocks(dP, rdP, layout, 1e-2)
    assert rel_err(dd, rd) <= 1e-2, "d state"
    assert torch.equal(dP, got[1][0]) and torch.equal(dd, got[1][1])


@pytest.mark.parametrize("knobs", TUNING, ids=str)
def test_state_kernels_identical_across_tuning(knobs):
    bl, positions, length, k = 16, [0, 3, 16, 40], 3000, 3
    layout = GatingLayout(8, 4, 16)
    P = projections(4, length, layout, seed=9)
    data = random_state(4, 8, 16, k, bl, positions, seed=9).float().cuda()
    state = StateArgs(data=data, pos=torch.tensor(positions, device="cuda"))
    dZ = torch.randn(4, length, layout.inner, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(data.shape, device="cuda")
    got = []
    for spec in (fused_spec(k=k), fused_spec(k=k, **knobs)):
        ks = swrgen.load(spec).kernels
        Z, new, _ = launch.forward(ks, P, layout, DM, state=state, want_state=True, poison=NAN)
        dP, dd = launch.backward(ks, P, dZ, layout, DM, state=state, d_state_out=d_out, want_d_state=True, poison=NAN)
        got.append((Z, new, dP, dd))
    for name, u, v in zip(("Z", "new state", "dP", "dstate"), *got, strict=True):
        assert torch.equal(u, v), f"{name} changed with tuning {knobs}"


# --- the layer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_prefill_steps_and_chunks_match_full(dtype):
    torch.manual_seed(0)
    m = Phalanx(64, kv_heads=2, device="cuda", dtype=dtype)
    x = torch.randn(2, 100, 64, device="cuda", dtype=dtype)
    full = m(x).float()
    o1, s = m(x[:, :37], return_state=True)
    outs = [o1]
    for t in range(37, 60):
        o, s = m.step(x[:, t], s)
        outs.append(o[:, None])
    o3, s = m(x[:, 60:], state=s, return_state=True)
    outs.append(o3)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.cat(outs, 1).float(), full, rtol=tol, atol=tol)
    assert s.positions() == [100, 100] and s.device.type == "cuda"
    y = m(x[:1], cu_seqlens=torch.tensor([0, 30, 100], device="cuda", dtype=torch.int32)).float()
    torch.testing.assert_close(y[:, 30:], m(x[:1, 30:]).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("fused", [True, False])
def test_layer_chunked_training_equals_one_pass(fused):
    torch.manual_seed(0)
    m = Phalanx(64, kv_heads=2, fused=fused, device="cuda", dtype=torch.float32)
    x = torch.randn(2, 300, 64, device="cuda")
    y1, s = m(x[:, :18], return_state=True)
    y2, s = m(x[:, 18:150], state=s, return_state=True)
    y3 = m(x[:, 150:], state=s)
    params = list(m.parameters())
    g1 = torch.autograd.grad(torch.cat([y1, y2, y3], 1).square().sum(), params)
    g2 = torch.autograd.grad(m(x).square().sum(), params)
    for a, b in zip(g1, g2, strict=True):
        assert rel_err(a, b) <= 1e-4


def test_layer_fused_equals_unfused_packed_with_state():
    torch.manual_seed(1)
    f = Phalanx(128, kv_heads=4, device="cuda", dtype=torch.float32)
    u = Phalanx(128, kv_heads=4, fused=False, device="cuda", dtype=torch.float32)
    u.load_state_dict(f.state_dict())
    lens = [5, 0, 33, 200]
    cu = torch.tensor([0, 5, 5, 38, 238])
    x = torch.randn(1, 238, 128, device="cuda", requires_grad=True)
    st0 = SwrState(random_state(4, 8, 16, 2, 16, [7, 0, 16, 1], seed=2).float().cuda(), [7, 0, 16, 1], 16)
    yf, sf = f(x, cu_seqlens=cu, state=st0, return_state=True)
    yu, su = u(x, cu_seqlens=cu, state=st0, return_state=True)
    assert rel_err(yf, yu) <= 1e-4 and rel_err(sf.data, su.data) <= 1e-4
    assert sf.positions() == su.positions() == [p + n for p, n in zip([7, 0, 16, 1], lens, strict=True)]
    g = torch.randn_like(yf)
    (gf,) = torch.autograd.grad(yf, x, g)
    (gu,) = torch.autograd.grad(yu, x, g)
    assert rel_err(gf, gu) <= 1e-4


# --- decoding against state slots ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_decode_kernel_equals_the_reference(k, kv_heads):
    layout, bl = GatingLayout(8, kv_heads, 16), 16
    slots, batch = 10, 6
    positions = [0, 1, 15, 16, 31, 47, 5, 9, 14, 63]
    data = random_state(slots, 8, 16, k, bl, positions, seed=k).float()
    pos = torch.tensor(positions)
    idx = torch.tensor([3, 0, 9, 4, 1, 8])
    P = projections(batch, 1, layout, seed=k)[:, 0]
    kw = dict(heads=8, kv_heads=kv_heads, window_blocks=k, decay_max=DM)
    cpu_data = data.clone()
    Zr = phalanx_decode(P.cpu(), cpu_data, pos, idx, **kw)
    gpu_data = data.cuda()
    Z = phalanx_decode(P, gpu_data, pos.cuda(), idx.cuda(), **kw)
    assert rel_err(Z, Zr) <= 1e-2
    torch.testing.assert_close(gpu_data.cpu(), cpu_data, rtol=1e-5, atol=1e-5)
    untouched = [i for i in range(slots) if i not in idx.tolist()]
    assert torch.equal(gpu_data.cpu()[untouched], data[untouched])


def test_decode_continues_prefill_slots_at_different_positions_in_one_graph():
    """Packed prefill of three prompts into slots, then one captured decode graph replayed across tile edges,
    equals running each prompt and its continuation through the full forward."""
    torch.manual_seed(3)
    m = Phalanx(64, kv_heads=2, device="cuda", dtype=torch.float32)
    lens, steps = [5, 16, 30], 20
    x = torch.randn(3, max(lens) + steps, 64, device="cuda")
    prompt = torch.cat([x[i, : lens[i]] for i in range(3)])[None]
    cu = [0, 5, 21, 51]
    _, st = m(prompt, cu_seqlens=cu, return_state=True)
    pool = torch.zeros(8, 4, 16, 4, device="cuda")
    pool[..., 1] = 1
    pos = torch.zeros(8, dtype=torch.int64, device="cuda")
    idx = torch.tensor([6, 2, 4], device="cuda")
    pool.index_copy_(0, idx, st.data)
    pos.index_copy_(0, idx, st.pos)
    x_in = torch.stack([x[i, lens[i]] for i in range(3)])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a copy of the pool
        m.decode_(x_in, pool.clone(), pos, idx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        Z = m.decode_(x_in, pool, pos, idx)
        out = m.out_proj(Z)
    ones = torch.ones(3, dtype=torch.int64, device="cuda")
    got = []
    for t in range(steps):
        x_in.copy_(torch.stack([x[i, lens[i] + t] for i in range(3)]))
        graph.replay()
        got.append(out.clone())
        pos.index_add_(0, idx, ones)
    for i in range(3):
        with torch.no_grad():
            full = m(x[i : i + 1, : lens[i] + steps])[0, lens[i] :]
        torch.testing.assert_close(torch.stack([g[i] for g in got]), full, rtol=1e-4, atol=1e-4)
