"""Context parallelism on CUDA (skipped without a GPU).

* One GPU: every rank of a context-parallel call simulated in this process (the same code as across
  processes, messages through a mailbox: ``swrgen.distributed.testing``), the CUDA kernels doing the tails,
  heads and state injections; and a real NCCL group of world size 1 (the whole path, no edges).
* Two or more GPUs: real NCCL worker processes (up to 4), the SWR, the fused Phalanx gating and the
  hybrid LM with torch's own ``context_parallel`` ring attention in its global layers (CUDA only), against
  one GPU running the whole sequences.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import swrgen
from swrgen.distributed.testing import WorkerPool, free_port, simulate_phalanx_gating, simulate_swr

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)

LAYOUTS = [[64, 64], [40, 7, 0, 81], [1, 2, 3, 122], [16, 16, 16, 80], [100, 28]]


def _multi_gpu() -> int:
    return min(4, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _device() -> torch.device:
    """This worker's GPU (the CPU in a gloo group: how the cases are checked on a machine without GPUs)."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("lengths", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_simulated_swr_cuda(lengths, k, dtype):
    g = torch.Generator().manual_seed(sum(lengths) + k)
    total = sum(lengths)
    a = torch.rand(2, 8, total, generator=g).to("cuda", dtype).requires_grad_()
    x = torch.randn(2, 8, 16, total, generator=g).to("cuda", dtype).requires_grad_()
    dy = torch.randn(2, 8, 16, total, generator=g, device="cpu").cuda()
    y = swrgen.swr(a, x, window_blocks=k, block_len=16)
    ga, gx = torch.autograd.grad(y, (a, x), dy)
    yc = torch.cat(simulate_swr(a, x, lengths, window_blocks=k, block_len=16), dim=-1)
    ga2, gx2 = torch.autograd.grad(yc, (a, x), dy)
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx2.float(), gx.float(), **tol)
    torch.testing.assert_close(ga2.float(), ga.float(), **tol)


@pytest.mark.parametrize("lengths", LAYOUTS)
def test_simulated_packed_swr_cuda(lengths):
    total = sum(lengths)
    cu = [0, 5, total // 2, total // 2, total - 3, total]
    g = torch.Generator().manual_seed(total)
    a = torch.rand(1, 4, 16, total, generator=g).cuda().requires_grad_()
    x = torch.randn(1, 4, 16, total, generator=g).cuda().requires_grad_()
    y = swrgen.swr(a, x, window_blocks=2, block_len=16, cu_seqlens=cu)
    yc = torch.cat(simulate_swr(a, x, lengths, window_blocks=2, block_len=16, cu_seqlens=cu), dim=-1)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(yc, (a, x), dy), torch.autograd.grad(y, (a, x), dy), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lengths", LAYOUTS)
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_simulated_phalanx_gating_cuda(lengths, kv_heads):
    from swrgen.ops.phalanx import GatingLayout

    total = sum(lengths)
    layout = GatingLayout(8, kv_heads, 16)
    g = torch.Generator().manual_seed(total + kv_heads)
    P = torch.randn(2, total, layout.width, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    kw = {"heads": 8, "kv_heads": kv_heads, "window_blocks": 2, "block_len": 16}
    Z = swrgen.phalanx_gating(P, **kw)
    Zc = torch.cat(simulate_phalanx_gating(P, lengths, **kw), dim=1)
    torch.testing.assert_close(Zc.float(), Z.float(), rtol=2e-2, atol=2e-2)
    dZ = torch.randn_like(Z)
    (g1,) = torch.autograd.grad(Z, P, dZ)
    (g2,) = torch.autograd.grad(Zc, P, dZ)
    torch.testing.assert_close(g2.float(), g1.float(), rtol=3e-2, atol=3e-2)


@pytest.fixture
def nccl_world1():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_world_size_one_nccl(nccl_world1):
    """The whole path (agreement on the device, no edges) on one GPU, and the layer and the hybrid with torch's
    ring attention at world size 1."""
    from torch.distributed.device_mesh import init_device_mesh

    from swrgen.distributed.attention import torch_context_parallel
    from swrgen.distributed.hybrid import HybridConfig, HybridLM, lm_loss
    from swrgen.nn import Phalanx

    a = torch.rand(2, 4, 100, device="cuda")
    x = torch.randn(2, 4, 16, 100, device="cuda")
    torch.testing.assert_close(swrgen.swr(a, x, cp_group=nccl_world1), swrgen.swr(a, x), rtol=0, atol=0)
    layer = Phalanx(64, head_dim=16).cuda()
    h = torch.randn(2, 70, 64, device="cuda")
    torch.testing.assert_close(layer(h, cp_group=nccl_world1), layer(h), rtol=1e-6, atol=1e-6)

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab=64, dim=64, layers=4, attn_heads=4)).cuda()
    tokens = torch.randint(0, 64, (2, 129), device="cuda")
    ref = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], tokens[:, 1:].numel())
    mesh = init_device_mesh("cuda", (1,))
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    with torch_context_parallel(mesh, [inputs, labels], [1, 1]):
        loss = lm_loss(model(inputs, cp_group=mesh.get_group(), attention="torch"), labels, labels.numel())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- several GPUs, real NCCL


def case_nccl_swr(rank: int, world: int, lengths: list[int], k: int) -> None:
    dev = _device()
    total = sum(lengths)
    g = torch.Generator().manual_seed(total)
    a = torch.rand(2, 8, total, generator=g).to(dev, torch.bfloat16)
    x = torch.randn(2, 8, 16, total, generator=g).to(dev, torch.bfloat16)
    dy = torch.randn(2, 8, 16, total, generator=g).to(dev)
    ra, rx = a.clone().requires_grad_(), x.clone().requires_grad_()
    ry = swrgen.swr(ra, rx, window_blocks=k)
    (ry * dy).sum().backward()
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    la, lx = a[..., s:e].clone().requires_grad_(), x[..., s:e].clone().requires_grad_()
    y = swrgen.swr(la, lx, window_blocks=k, cp_group=dist.group.WORLD)
    (y * dy[..., s:e]).sum().backward()
    torch.testing.assert_close(y, ry[..., s:e], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lx.grad.float(), rx.grad[..., s:e].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(la.grad.float(), ra.grad[..., s:e].float(), rtol=2e-2, atol=2e-2)


def case_nccl_hybrid(rank: int, world: int, attention: str) -> None:
    """A few training steps of the hybrid LM, context parallel (equal slices), FSDP2 over the CP ranks,
    against one GPU: fused Phalanx layers, and torch's ring attention ("torch") or all-gathered K/V."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from swrgen.distributed.attention import torch_context_parallel
    from swrgen.distributed.hybrid import HybridConfig, HybridLM, lm_loss

    dev = _device()
    torch.manual_seed(0)
    base = HybridLM(HybridConfig(vocab=128, dim=128, layers=4, attn_heads=4)).to(dev)
    tokens = torch.randint(0, 128, (2, 256 * world + 1), device=dev, generator=torch.Generator(dev).manual_seed(1))
    total = tokens[:, 1:].numel()
    ref = copy.deepcopy(base)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    model = copy.deepcopy(base)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mesh = init_device_mesh("cuda", (world,))
    for _ in range(3):
        lr = lm_loss(ref(tokens[:, :-1]), tokens[:, 1:], total)
        lr.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        if attention == "torch":
            with torch_context_parallel(mesh, [inputs, labels], [1, 1]):
                loss = lm_loss(model(inputs, cp_group=mesh.get_group(), attention="torch"), labels, total)
                (loss * world).backward()
        else:
            n = inputs.shape[1] // world
            sl = slice(rank * n, (rank + 1) * n)
            loss = lm_loss(model(inputs[:, sl], cp_group=mesh.get_group()), labels[:, sl], total)
            (loss * world).backward()
        opt.step()
        opt.zero_grad()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed, lr.detach(), rtol=1e-3, atol=1e-3)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def nccl_pool():
    world = _multi_gpu()
    if world < 2:
        pytest.skip("needs 2 or more GPUs")
    with WorkerPool(world, case_timeout_s=300, pg_timeout_s=120, backend="nccl") as pool:
        yield pool


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nccl_swr(nccl_pool, k):
    world = nccl_pool.world
    for lengths in ([64] * world, [40, 7, *[0] * (world - 3), 81][:world] if world >= 3 else [3, 125],
                    [1] * (world - 1) + [200]):  # fmt: skip
        nccl_pool.run(case_nccl_swr, list(lengths), k)


@pytest.mark.parametrize("attention", ["torch", "gather"])
def test_nccl_hybrid_fsdp(nccl_pool, attention):
    nccl_pool.run(case_nccl_hybrid, attention)
