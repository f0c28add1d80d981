"""GPU tests of packed sequences (cu_seqlens) and streaming state (skip without CUDA)."""

from __future__ import annotations

import itertools

import pytest
import torch

import swrgen
from swrgen.ops.swr.reference import swr_reference
from tests.gpu_util import make_inputs, rel_err

pytestmark = pytest.mark.gpu

LENGTHS = {
    "mixed": [1, 15, 17, 1000, 16, 33, 257],  # element-wise kernel (starts not multiples of 8)
    "aligned": [8, 1024, 16, 4096, 40],  # vector kernel
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", list(LENGTHS))
def test_packed_sequences_forward_backward(k, kind):
    lens = LENGTHS[kind]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    a, x = make_inputs(1, 3, 16, int(cu[-1]), seed=k)
    a.requires_grad_()
    x.requires_grad_()
    y = swrgen.swr(a, x, window_blocks=k, cu_seqlens=cu)
    dy = torch.randn_like(y)
    y.backward(dy)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        a64 = a.detach()[..., s:e].double().requires_grad_()
        x64 = x.detach()[..., s:e].double().requires_grad_()
        ref = swr_reference(a64, x64, k, 16)
        ref.backward(dy[..., s:e].double())
        assert rel_err(y[..., s:e].detach(), ref.detach()) <= 2e-3, f"sequence [{s}, {e})"
        assert rel_err(x.grad[..., s:e], x64.grad) <= 5e-3
        assert rel_err(a.grad[..., s:e], a64.grad) <= 5e-3
        # Each sequence alone through the dense kernel gives the same bits.
        alone = swrgen.swr(a.detach()[..., s:e].contiguous(), x.detach()[..., s:e].contiguous(), window_blocks=k)
        assert torch.equal(alone, y[..., s:e].detach())


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("split", [1, 7, 8, 15, 16, 17, 100, 1024, 1031])
def test_prefill_then_continue_equals_one_shot(k, split):
    a, x = make_inputs(2, 3, 16, 2100, seed=split + 10 * k)
    y_all = swrgen.swr(a, x, window_blocks=k)
    y1, st = swrgen.swr(a[..., :split], x[..., :split], window_blocks=k, return_state=True)
    y2, st2 = swrgen.swr(a[..., split:], x[..., split:], window_blocks=k, initial_state=st, return_state=True)
    assert st2.pos.tolist() == [2100, 2100] and st2.positions() == [2100, 2100]
    ref = swr_reference(a.double(), x.double(), k, 16)
    y = torch.cat([y1, y2], dim=-1)
    assert rel_err(y, ref) <= 2e-3
    assert rel_err(y2, y_all[..., split:]) <= 1e-5  # same fp32 math up to the state's rounding


@pytest.mark.parametrize("k", [2, 3])
def test_decode_steps_continue_a_prefill(k):
    from swrgen.ops.swr.state import decode_step

    a, x = make_inputs(3, 2, 16, 300, seed=k)
    ref = swr_reference(a.double(), x.double(), k, 16)
    _, st = swrgen.swr(a[..., :250], x[..., :250], window_blocks=k, return_state=True)
    outs = []
    for t in range(250, 300):
        y_t, st = decode_step(a[..., t], x[..., t], st, k, 16)
        outs.append(y_t)
    assert rel_err(torch.stack(outs, dim=-1), ref[..., 250:]) <= 2e-3


@pytest.mark.parametrize("tiles_per_warp", [3, 100])
@pytest.mark.parametrize("kind", list(LENGTHS))
def test_packed_sequences_under_a_tuned_tiles_per_warp(tuned_cache, kind, tiles_per_warp):
    """A tuned variant whose tiles_per_warp is not the spec's serves a packed batch: every tile of every
    sequence is written (outputs poisoned first), the bits are the spec's own config's, and they match the
    float64 reference, forward and backward."""
    from swrgen.ops.swr import launch
    from swrgen.ops.swr.op import default_kernels
    from swrgen.tune import store

    lens = [*LENGTHS[kind], 3000]  # 188 tiles: many chunks of 3
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    a, x = make_inputs(1, 3, 16, cu[-1], seed=tiles_per_warp)
    dy = torch.randn(x.shape, device="cuda")
    ks = default_kernels(16, False, x.dtype, a.dtype, 2, 16, torch.float32)
    dev = ks.on(x.get_device())
    seqs = launch.Sequences(cu)
    shape = launch.tuning_shape(tuple(x.shape), seqs)
    store.save(ks.spec, dev.arch, shape, {"target": {"tiles_per_warp": tiles_per_warp}}, device=dev.card)
    assert ks.for_shape(dev.index, shape, "fwd").spec.target.tiles_per_warp == tiles_per_warp
    assert tiles_per_warp != ks.spec.target.tiles_per_warp
    y, _, _ = launch.forward(ks, a, x, seqs=seqs, poison=float("nan"))
    dx, da, _ = launch.backward(ks, a, x, dy, seqs=seqs, poison=float("nan"))
    with store.disabled():  # the spec's own tiles_per_warp: tuning never changes a bit
        assert torch.equal(launch.forward(ks, a, x, seqs=seqs)[0], y)
        dx0, da0, _ = launch.backward(ks, a, x, dy, seqs=seqs)
        assert torch.equal(dx0, dx) and torch.equal(da0, da)
    for s, e in itertools.pairwise(cu):
        a64 = a[..., s:e].double().requires_grad_()
        x64 = x[..., s:e].double().requires_grad_()
        ref = swr_reference(a64, x64, 2, 16)
        ref.backward(dy[..., s:e].double())
        assert rel_err(y[..., s:e], ref.detach()) <= 2e-3, f"y of sequence [{s}, {e})"
        assert rel_err(dx[..., s:e], x64.grad) <= 5e-3, f"dx of sequence [{s}, {e})"
        assert rel_err(da[..., s:e], a64.grad) <= 5e-3, f"da of sequence [{s}, {e})"
