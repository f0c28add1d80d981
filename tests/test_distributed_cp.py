"""Context parallelism on real torch.distributed: CPU worker processes in a gloo group (2 and 4 ranks).

Every case runs on every rank of a pool (``swrgen.distributed.testing.WorkerPool``: spawned once per module,
a deadline on every case, gloo timeouts on every collective) and compares this rank's slice with one
process running the whole sequences, computed on the same rank from the same seed. Forward outputs
must be bitwise equal in float64 (and float32: the CPU path computes in float64); gradients agree to
float64 rounding (the gradient that crosses an edge enters as the state's gradient, the same sums in
another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import swrgen
from swrgen.distributed import ContextParallelError, cp_context
from swrgen.distributed.testing import WorkerPool
from swrgen.nn import Phalanx
from swrgen.ops.swr.state import SwrState

GRAD_TOL = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(scope="module")
def pool2():
    with WorkerPool(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool4():
    with WorkerPool(4) as pool:
        yield pool


def _span(lengths: list[int], rank: int) -> tuple[int, int]:
    start = sum(lengths[:rank])
    return start, start + lengths[rank]


def _swr_inputs(seed: int, batch: int, heads: int, head_dim: int, total: int, per_channel: bool,
                dtype: torch.dtype):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, head_dim, total) if per_channel else (batch, heads, total)
    a = (torch.rand(shape, generator=g, dtype=torch.float64) * 1.2 - 0.1).to(dtype)  # some negative, some > 1
    x = torch.randn(batch, heads, head_dim, total, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(batch, heads, head_dim, total, generator=g, dtype=torch.float64)
    return a, x, dy


# ---------------------------------------------------------------- cases (run on every rank)


def case_swr(rank: int, world: int, lengths: list[int], k: int, bl: int, per_channel: bool, cu=None,
             dtype: torch.dtype = torch.float64, use_context: bool = False) -> dict:  # fmt: skip
    """swr on this rank's slice (dense, or packed with global cu) against one process; grads to a and x."""
    assert len(lengths) == world
    total = sum(lengths)
    batch = 1 if cu is not None else 2
    a, x, dy = _swr_inputs(7 + total + k, batch, 3, 4, total, per_channel, dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dy = dy.to(out_dtype)
    ra, rx = a.clone().requires_grad_(), x.clone().requires_grad_()
    ry = swrgen.swr(ra, rx, window_blocks=k, block_len=bl, cu_seqlens=cu)
    (ry * dy).sum().backward()

    s, e = _span(lengths, rank)
    la, lx = a[..., s:e].clone().requires_grad_(), x[..., s:e].clone().requires_grad_()
    group = cp_context(dist.group.WORLD, e - s, cu) if use_context else dist.group.WORLD
    y = swrgen.swr(la, lx, window_blocks=k, block_len=bl, cu_seqlens=cu, cp_group=group)
    (y * dy[..., s:e]).sum().backward()
    assert y.dtype == ry.dtype and y.shape == ry[..., s:e].shape
    assert torch.equal(y, ry[..., s:e]), f"rank {rank}: y differs by {(y - ry[..., s:e]).abs().max().item()}"
    tol = GRAD_TOL if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(lx.grad, rx.grad[..., s:e], **tol)
    torch.testing.assert_close(la.grad, ra.grad[..., s:e], **tol)
    return {"dx": (lx.grad - rx.grad[..., s:e]).abs().max().item() if e > s else 0.0}


def case_swr_no_grad(rank: int, world: int, lengths: list[int], k: int) -> None:
    """Inference (no autograd recorded on any rank) takes the same exchange, forward only."""
    total = sum(lengths)
    a, x, _ = _swr_inputs(3, 2, 2, 4, total, False, torch.float32)
    ref = swrgen.swr(a, x, window_blocks=k, block_len=4)
    s, e = _span(lengths, rank)
    with torch.no_grad():
        y = swrgen.swr(a[..., s:e], x[..., s:e], window_blocks=k, block_len=4, cp_group=dist.group.WORLD)
    assert torch.equal(y, ref[..., s:e])


def case_phalanx_gating(rank: int, world: int, lengths: list[int], k: int, bl: int, kv_heads: int, cu=None) -> None:
    """phalanx_gating on this rank's slice of P against one process; gradient to P."""
    from swrgen.ops.phalanx import GatingLayout

    total = sum(lengths)
    layout = GatingLayout(4, kv_heads, 16)
    batch = 1 if cu is not None else 2
    g = torch.Generator().manual_seed(11 + total)
    P = torch.randn(batch, total, layout.width, generator=g, dtype=torch.float64)
    dZ = torch.randn(batch, total, layout.inner, generator=g, dtype=torch.float64)
    kw = {"heads": 4, "kv_heads": kv_heads, "window_blocks": k, "block_len": bl, "decay_max": 0.9}
    rP = P.clone().requires_grad_()
    rZ = swrgen.phalanx_gating(rP, cu_seqlens=cu, **kw)
    (rZ * dZ).sum().backward()
    s, e = _span(lengths, rank)
    lP = P[:, s:e].clone().requires_grad_()
    Z = swrgen.phalanx_gating(lP, cu_seqlens=cu, cp_group=dist.group.WORLD, **kw)
    (Z * dZ[:, s:e]).sum().backward()
    assert torch.equal(Z, rZ[:, s:e])
    torch.testing.assert_close(lP.grad, rP.grad[:, s:e], **GRAD_TOL)


def case_phalanx_layer(rank: int, world: int, lengths: list[int], k: int, fused: bool, cu=None,
                       use_context: bool = False) -> None:  # fmt: skip
    """The Phalanx layer on this rank's slice: output, grad to x, and the parameters' gradients summed over the
    ranks, against one process."""
    total = sum(lengths)
    torch.manual_seed(5)
    layer = Phalanx(32, head_dim=16, kv_heads=1, window_blocks=k, block_len=8, fused=fused).double()
    batch = 1 if cu is not None else 2
    g = torch.Generator().manual_seed(13 + total)
    x = torch.randn(batch, total, 32, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, total, 32, generator=g, dtype=torch.float64)
    rx = x.clone().requires_grad_()
    (layer(rx, cu_seqlens=cu) * dout).sum().backward()
    ref_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    s, e = _span(lengths, rank)
    lx = x[:, s:e].clone().requires_grad_()
    group = cp_context(dist.group.WORLD, e - s, cu) if use_context else dist.group.WORLD
    out = layer(lx, cu_seqlens=cu, cp_group=group)
    (out * dout[:, s:e]).sum().backward()
    # Per-token maps (the projections) add rounding of their own: not bitwise, to float64 rounding.
    torch.testing.assert_close(out, layer(x, cu_seqlens=cu)[:, s:e], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lx.grad, rx.grad[:, s:e], **GRAD_TOL)
    for p, ref in zip(layer.parameters(), ref_grads, strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref, rtol=1e-11, atol=1e-11)


def case_context_many_layers(rank: int, world: int, lengths: list[int]) -> None:
    """One cp_context serves a stack of layers (no per-call all-gather) and gives the per-call result."""
    total = sum(lengths)
    torch.manual_seed(2)
    layers = torch.nn.ModuleList([Phalanx(32, head_dim=16, window_blocks=k, block_len=4) for k in (1, 2, 3)]).double()
    x = torch.randn(2, total, 32, dtype=torch.float64)
    s, e = _span(lengths, rank)
    ctx = cp_context(dist.group.WORLD, e - s)
    y_ctx, y_pg, ref = x[:, s:e], x[:, s:e], x
    for layer in layers:
        y_ctx = layer(y_ctx, cp_group=ctx)
        y_pg = layer(y_pg, cp_group=dist.group.WORLD)
        ref = layer(ref)
    assert torch.equal(y_ctx, y_pg)
    torch.testing.assert_close(y_ctx, ref[:, s:e], rtol=1e-13, atol=1e-13)


def _expect_error(fn, *, match: str, kind: type[BaseException] = ContextParallelError) -> str:
    try:
        fn()
    except kind as err:
        assert match in str(err), f"{match!r} not in {err}"
        return str(err)
    raise AssertionError(f"no {kind.__name__} raised (expected one matching {match!r})")


def case_errors(rank: int, world: int, what: str) -> str:
    """Every rank gets the same error (none waits for a message that never comes)."""
    g = dist.group.WORLD
    a, x = torch.rand(2, 2, 16), torch.randn(2, 2, 4, 16)
    if what == "cu_differs":  # cu_seqlens differing between ranks
        cu = [0, 10, 32] if rank == 0 else [0, 12, 32]
        return _expect_error(lambda: swrgen.swr(a[:1], x[:1], cu_seqlens=cu, cp_group=g), match="cu_seqlens")
    if what == "total":  # slices do not add up to the packed total
        return _expect_error(lambda: swrgen.swr(a[:1], x[:1], cu_seqlens=[0, 10, 40], cp_group=g),
                             match="do not add up")  # fmt: skip
    if what == "batch":
        n = 2 if rank == 0 else 1
        return _expect_error(lambda: swrgen.swr(a[:n], x[:n], cp_group=g), match="batch size")
    if what == "heads":
        h = 2 if rank == 0 else 1
        return _expect_error(lambda: swrgen.swr(a[:, :h], x[:, :h], cp_group=g), match="number of heads")
    if what == "window":
        k = 2 if rank == 0 else 3
        return _expect_error(lambda: swrgen.swr(a, x, window_blocks=k, cp_group=g), match="window_blocks")
    if what == "dtype":
        xx = x if rank == 0 else x.double()
        return _expect_error(lambda: swrgen.swr(a, xx, cp_group=g), match="input dtype")
    if what == "grad":  # only some ranks record autograd: their backward would wait forever
        aa = a.clone().requires_grad_(rank == 0)
        return _expect_error(lambda: swrgen.swr(aa, x, cp_group=g), match="autograd")
    if what == "op":
        if rank == 0:
            return _expect_error(lambda: swrgen.swr(a, x, cp_group=g), match="the op")
        P = torch.randn(2, 16, 2 + 2 * 2 * 16 + 2 * 16)
        return _expect_error(lambda: swrgen.phalanx_gating(P, heads=2, cp_group=g), match="the op")
    if what == "initial_state":
        st = SwrState.zeros(2, 2, 4, 2, block_len=16)
        return _expect_error(lambda: swrgen.swr(a, x, initial_state=st, cp_group=g), match="initial_state")
    if what == "return_state":
        return _expect_error(lambda: swrgen.swr(a, x, return_state=True, cp_group=g), match="return_state")
    if what == "local":  # a malformed argument on one rank only reaches every rank
        bad = [0, 20, 10, 32] if rank == world - 1 else [0, 20, 32]
        return _expect_error(lambda: swrgen.swr(a[:1], x[:1], cu_seqlens=bad, cp_group=g),
                             match=f"rank {world - 1}: ValueError: cu_seqlens must be non-decreasing")  # fmt: skip
    if what == "context_sum":  # cp_context: slices that do not add up to the packed total
        return _expect_error(lambda: cp_context(g, 16, [0, 5, 40]), match="do not add up")
    if what == "context_length":  # a call whose slice is not the context's raises on that rank
        ctx = cp_context(g, 16)
        return _expect_error(lambda: swrgen.swr(a[..., :8], x[..., :8], cp_group=ctx), match="CPContext")
    raise AssertionError(what)


def case_layer_rejects_state(rank: int, world: int) -> str:
    layer = Phalanx(32, head_dim=16)
    st = layer.init_state(2)
    x = torch.randn(2, 8, 32)
    return _expect_error(lambda: layer(x, state=st, cp_group=dist.group.WORLD), match="initial_state")


# ---------------------------------------------------------------- tests: 2 ranks


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("lengths", [[16, 16], [13, 20], [0, 9], [9, 0], [1, 30], [3, 2], [24, 8]])
def test_swr_two_ranks(pool2, lengths, k, per_channel):
    pool2.run(case_swr, lengths, k, 4, per_channel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swr_low_precision_inputs(pool2, dtype):
    """Lower-precision inputs: still bitwise y (float64 inside, states in float64)."""
    pool2.run(case_swr, [21, 14], 2, 4, False, None, dtype)


@pytest.mark.parametrize(("lengths", "cu"), [
    ([20, 20], [0, 5, 33, 40]),         # one sequence crosses the edge mid-tile
    ([20, 20], [0, 20, 40]),            # a boundary exactly at the edge: nothing crosses
    ([20, 20], [0, 3, 3, 22, 22, 40]),  # empty sequences around the crossing one
    ([2, 30], [0, 1, 32]),              # the crossing sequence is short on rank 0
    ([0, 25], [0, 10, 25]),             # an empty rank
])  # fmt: skip
@pytest.mark.parametrize("k", [1, 2, 3])
def test_swr_packed_two_ranks(pool2, lengths, cu, k):
    pool2.run(case_swr, lengths, k, 4, k == 2, cu)


def test_no_grad_two_ranks(pool2):
    pool2.run(case_swr_no_grad, [10, 23], 2)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize(("lengths", "cu"), [([19, 14], None), ([0, 8], None), ([17, 15], [0, 9, 30, 32])])
def test_phalanx_gating_two_ranks(pool2, lengths, cu, kv_heads):
    pool2.run(case_phalanx_gating, lengths, 2, 8, kv_heads, cu)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_phalanx_layer_two_ranks(pool2, k, fused):
    pool2.run(case_phalanx_layer, [21, 11], k, fused)


def test_phalanx_layer_packed_context(pool2):
    pool2.run(case_phalanx_layer, [12, 20], 2, False, [0, 7, 25, 32], True)


def test_context_serves_many_layers(pool2):
    pool2.run(case_context_many_layers, [11, 22])


@pytest.mark.parametrize("what", ["cu_differs", "total", "batch", "heads", "window", "dtype", "grad", "op",
                                  "initial_state", "return_state", "local", "context_sum"])  # fmt: skip
def test_errors_reach_every_rank(pool2, what):
    messages = pool2.run(case_errors, what)
    if what not in ("local",):
        assert len(set(messages)) == 1, messages  # the same message everywhere


def test_context_length_mismatch_raises_locally(pool2):
    pool2.run(case_errors, "context_length")


def test_layer_rejects_state(pool2):
    pool2.run(case_layer_rejects_state)


# ---------------------------------------------------------------- tests: 4 ranks


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("lengths", [
    [16, 16, 16, 16],  # on tile edges
    [7, 9, 13, 3],     # off tile edges, shorter than a tile
    [0, 5, 0, 27],     # empty ranks pass the state through
    [1, 1, 1, 40],     # a chain of one-token slices
    [33, 0, 1, 30],
])  # fmt: skip
def test_swr_four_ranks(pool4, lengths, k):
    pool4.run(case_swr, lengths, k, 4, k == 3)


@pytest.mark.parametrize(("lengths", "cu"), [
    ([20, 20, 20, 20], [0, 5, 45, 45, 70, 80]),  # a sequence over three ranks, an empty one, one more edge
    ([10, 1, 2, 30], [0, 4, 40, 43]),            # one sequence across every edge
    ([20, 0, 20, 20], [0, 20, 40, 60]),          # boundaries on the edges
])  # fmt: skip
@pytest.mark.parametrize("k", [2, 3])
def test_swr_packed_four_ranks(pool4, lengths, cu, k):
    pool4.run(case_swr, lengths, k, 4, False, cu)


def test_swr_four_ranks_context(pool4):
    pool4.run(case_swr, [5, 17, 0, 9], 2, 4, False, None, torch.float64, True)


def test_phalanx_four_ranks(pool4):
    pool4.run(case_phalanx_gating, [9, 2, 0, 30], 3, 4, 2, None)
    pool4.run(case_phalanx_layer, [6, 14, 3, 20], 2, False, [0, 4, 30, 43])


def test_errors_four_ranks(pool4):
    messages = pool4.run(case_errors, "cu_differs")
    assert len(set(messages)) == 1
    pool4.run(case_errors, "local")


# ---------------------------------------------------------------- many layouts, every rank in this process


def test_simulated_ranks_sweep():
    """Random layouts (1-5 ranks, empty and one-token slices, k = 1..4, odd tile lengths, packed sequences):
    the same code as across processes with messages through an in-process mailbox."""
    import random

    from swrgen.distributed.testing import simulate_phalanx_gating, simulate_swr

    rng = random.Random(0)
    for _ in range(80):
        lengths = [rng.choice([0, 1, 2, 3, 5, 8, 9, 16, 17]) for _ in range(rng.randint(1, 5))]
        total = sum(lengths)
        if total == 0:
            continue
        k, bl, per_channel = rng.choice([1, 2, 3, 4]), rng.choice([2, 3, 4, 8]), rng.random() < 0.3
        cuts = sorted(rng.randint(0, total) for _ in range(rng.randint(0, 3)))
        cu = [0, *cuts, total] if rng.random() < 0.5 else None
        a, x, dy = _swr_inputs(total, 1 if cu else 2, 2, 3, total, per_channel, torch.float64)
        a.requires_grad_()
        x.requires_grad_()
        y = swrgen.swr(a, x, window_blocks=k, block_len=bl, cu_seqlens=cu)
        yc = torch.cat(simulate_swr(a, x, lengths, window_blocks=k, block_len=bl, cu_seqlens=cu), dim=-1)
        assert torch.equal(yc, y), (lengths, k, bl, cu)
        for got, want in zip(torch.autograd.grad(yc, (a, x), dy), torch.autograd.grad(y, (a, x), dy), strict=True):
            torch.testing.assert_close(got, want, **GRAD_TOL)
    P = torch.randn(1, 30, 2 + 2 * 16 + 2 * 16, dtype=torch.float64, requires_grad=True)
    kw = {"heads": 2, "kv_heads": 1, "window_blocks": 3, "block_len": 4}
    Z = swrgen.phalanx_gating(P, cu_seqlens=[0, 13, 30], **kw)
    Zc = torch.cat(simulate_phalanx_gating(P, [5, 0, 2, 23], cu_seqlens=[0, 13, 30], **kw), dim=1)
    assert torch.equal(Zc, Z)
    dZ = torch.randn_like(Z)
    torch.testing.assert_close(torch.autograd.grad(Zc, P, dZ)[0], torch.autograd.grad(Z, P, dZ)[0], **GRAD_TOL)


def test_slice_plan_edges():
    """What crosses each edge, and which slices are short (the chain), on a hand-checked layout."""
    from swrgen.distributed.layout import SliceLayout, slice_plan

    lengths, k, bl = [10, 3, 0, 20, 15], 2, 4  # offsets 0, 10, 13, 13, 33, 48
    plans = [slice_plan(SliceLayout.from_lengths(r, lengths, None), 1, k, bl) for r in range(5)]
    assert [(p.recv, p.send) for p in plans] == [(False, True), (True, True), (True, True), (True, True),
                                                 (True, False)]  # fmt: skip
    # rank 1 holds 10..13 (the rest of tile 2): its state after 13 needs the incoming one; so does the empty
    # rank 2. Rank 3 (13..33) holds complete tiles 4..7: its tail is tile 7 plus the partial 32..33.
    assert [p.short for p in plans] == [False, True, True, False, False]
    assert (plans[3].tail_start, plans[3].tail_pos) == (28 - 13, 28)
    assert plans[3].head_end == 20 - 13  # the incoming state reaches the rest of tile 3 and tile 4 only
    assert plans[4].head_end == 40 - 33
    packed = SliceLayout.from_lengths(1, [10, 10], (0, 4, 4, 15, 20))
    p = slice_plan(packed, 1, k, bl)
    assert p.recv and not p.send and p.starts == (0, 5, 10) and p.pos == (6, 0)


# ---------------------------------------------------------------- the harness: a failing case fails, never hangs


def case_stuck(rank: int, world: int, how: str) -> None:
    from datetime import timedelta

    from swrgen.distributed import context_parallel

    if how == "sleep" and rank == 0:
        import time

        time.sleep(600)
    if how == "missing_message":  # rank 0 waits for a state that rank 1 never sends
        context_parallel.P2P_TIMEOUT = timedelta(seconds=2)
        if rank == 0:
            buf = torch.zeros(3)
            context_parallel.GroupComm(dist.group.WORLD, 0).post([], [(buf, 1)]).wait_recvs()


@pytest.mark.parametrize("how", ["sleep", "missing_message"])
def test_stuck_case_fails_in_time(pool2, how):
    import time

    from swrgen.distributed.testing import CaseFailed

    start = time.monotonic()
    with pytest.raises(CaseFailed):
        pool2.run(case_stuck, how, timeout_s=4)
    assert time.monotonic() - start < 30
    pool2.run(case_swr_no_grad, [4, 4], 1)  # the pool was restarted and works
