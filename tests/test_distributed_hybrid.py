"""The hybrid LM (Phalanx + causal attention) trained on real torch.distributed (CPU, gloo, 2 and 4 ranks):
context parallel (each rank a slice of every sequence), data parallel with DDP and FSDP2, and both, eager
and under torch.compile. A few AdamW steps must land where one process lands training on the whole batch.

What composes on the CPU: Phalanx context parallelism (swrgen.distributed), attention by all-gathered K/V
(``attention="gather"``), DDP, FSDP2 (``fully_shard``) and torch.compile (the context-parallel calls are
graph breaks). torch's own ``context_parallel`` does not run on the CPU (its ring attention dispatches the
CUDA SDPA kernels only); ``test_torch_context_parallel_needs_cuda`` pins down how it fails, and
tests/test_gpu_distributed.py runs it on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from swrgen.distributed.hybrid import HybridConfig, HybridLM, lm_loss
from swrgen.distributed.testing import WorkerPool

CONFIG = HybridConfig(vocab=61, dim=32, layers=4, global_every=2, attn_heads=2, head_dim=16, kv_heads=1,
                      window_blocks=2, block_len=8)  # fmt: skip
STEPS = 3
_GROUPS: dict[str, dist.ProcessGroup] = {}


@pytest.fixture(scope="module")
def pool2():
    with WorkerPool(2, case_timeout_s=240) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool4():
    with WorkerPool(4, case_timeout_s=240) as pool:
        yield pool


def _cp_group() -> dist.ProcessGroup:
    """A group of its own for the context-parallel exchange (the data-parallel wrappers use WORLD)."""
    if "cp" not in _GROUPS:
        _GROUPS["cp"] = dist.new_group(backend="gloo")
    return _GROUPS["cp"]


def _batch(batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, CONFIG.vocab, (batch, length + 1), generator=g)


def _reference(model: HybridLM, tokens: torch.Tensor) -> tuple[HybridLM, list[float]]:
    """One process, the whole batch, eager."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    for _ in range(STEPS):
        loss = lm_loss(model(inputs), labels, labels.numel())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def _lengths(total: int, world: int) -> list[int]:
    """Uneven slices, off tile edges (at 4 ranks one is shorter than a tile: a short slice in the chain)."""
    base = [total // world] * world
    base[0] += total - sum(base)
    if world > 1:
        shift = min(base[1] - 3, CONFIG.block_len + 1)
        base[0] += shift
        base[1] -= shift
    return base


def case_train(rank: int, world: int, parallel: str, wrapper: str, compiled: str | None) -> dict:
    """``STEPS`` AdamW steps against one process on the whole batch. parallel: "cp" (every rank a slice of
    each sequence; a wrapper then sums the slices' gradients over the ranks) or "dp" (every rank its own
    sequences). wrapper: "none" (gradients all-reduced by hand), "ddp" or "fsdp" (FSDP2 fully_shard per
    block and the model). compiled: None (eager) or a torch.compile backend."""
    torch.manual_seed(0)
    base = HybridLM(CONFIG).double()
    if parallel == "cp":
        tokens = _batch(2, 45)
        lengths = _lengths(45, world)
        s = sum(lengths[:rank])
        e = s + lengths[rank]
        inputs, labels = tokens[:, :-1][:, s:e], tokens[:, 1:][:, s:e]
        cp = _cp_group()
    else:
        tokens = _batch(2 * world, 24)
        per = tokens.shape[0] // world
        inputs, labels = tokens[rank * per : (rank + 1) * per, :-1], tokens[rank * per : (rank + 1) * per, 1:]
        cp = None
    total = tokens[:, 1:].numel()
    ref, ref_losses = _reference(base, tokens)

    model = copy.deepcopy(base)
    scale = 1.0
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        scale = float(world)  # DDP averages the ranks' gradients; the ranks' losses add up to the mean
    elif wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        scale = float(world)
    run = torch.compile(model, backend=compiled) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        logits = run(inputs, cp_group=cp) if cp is not None else run(inputs)
        loss = lm_loss(logits, labels, total)
        (loss * scale).backward()
        if wrapper == "none":
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-9, atol=1e-9)
    worst = 0.0
    inner = model.module if wrapper == "ddp" else model
    for (name, p), q in zip(inner.named_parameters(), ref.parameters(), strict=True):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), rtol=1e-7, atol=1e-7, msg=name)
        worst = max(worst, (full.detach() - q.detach()).abs().max().item())
    return {"max_param_diff": worst, "losses": losses}


def case_torch_cp_on_cpu(rank: int, world: int) -> str:
    """torch's context_parallel on CPU tensors: SDPA inside fails (no CPU ring attention)."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from swrgen.distributed.attention import torch_context_parallel

    mesh = init_device_mesh("cpu", (world,))
    q = torch.randn(1, 2, 8 * world, 4)
    k, v = q.clone(), q.clone()
    try:
        with torch_context_parallel(mesh, [q, k, v], [2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    except NotImplementedError as err:
        return str(err)
    raise AssertionError("torch's context_parallel ran SDPA on CPU tensors: update docs/context-parallel.md")


@pytest.mark.parametrize("wrapper", ["none", "ddp", "fsdp"])
def test_context_parallel_training(pool2, wrapper):
    pool2.run(case_train, "cp", wrapper, None)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_training(pool2, wrapper):
    pool2.run(case_train, "dp", wrapper, None)


@pytest.mark.parametrize(("parallel", "wrapper"), [("cp", "fsdp"), ("dp", "ddp"), ("cp", "ddp"), ("dp", "fsdp")])
def test_training_compiled(pool2, parallel, wrapper):
    pool2.run(case_train, parallel, wrapper, "aot_eager")


def test_context_parallel_training_four_ranks(pool4):
    pool4.run(case_train, "cp", "fsdp", None)


def test_torch_context_parallel_needs_cuda(pool2):
    messages = pool2.run(case_torch_cp_on_cpu)
    assert all("_scaled_dot_product_flash_attention_for_cpu" in m for m in messages), messages
