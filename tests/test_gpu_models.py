"""swrgen.models on the GPU: the hybrid LM with the generated kernels (fused Phalanx prefill, the decode kernel
over state slots) against the CPU float64 reference, generate() against the full forward, and CUDA-graph
decode steps against eager ones across positions and tile boundaries. Skipped without CUDA or transformers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("transformers")

LAYERS = ["linear_attention", "sliding_attention", "full_attention", "linear_attention"]


def _model(dtype: torch.dtype = torch.float32, device: str = "cuda", seed: int = 0, **kw):
    from swrgen.models import PhalanxHybridConfig, PhalanxHybridForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=len(LAYERS),
                layer_types=LAYERS, num_attention_heads=4, num_key_value_heads=2, phalanx_kv_heads=4,
                sliding_window=24, initializer_range=0.2, pad_token_id=0)  # fmt: skip
    model = PhalanxHybridForCausalLM(PhalanxHybridConfig(**{**base, **kw}))
    return model.to(device=device, dtype=dtype).eval()


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 101, (n,), generator=g).tolist() for n in lengths]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


def test_cuda_forward_matches_cpu_float64() -> None:
    gpu = _model()
    cpu = _model(torch.float64, "cpu")
    cpu.load_state_dict({k: v.double().cpu() for k, v in gpu.state_dict().items()})
    ids, mask = _left_padded(_prompts([1, 15, 16, 17, 70]))
    with torch.no_grad():
        want = cpu(ids, attention_mask=mask, use_cache=False).logits
        got = gpu(ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits
    valid = mask.bool()
    torch.testing.assert_close(got.cpu().double()[valid], want[valid], rtol=2e-3, atol=2e-3)


def test_cuda_generate_matches_full_forward() -> None:
    model = _model()
    prompts = _prompts([3, 16, 17, 40])
    ids, mask = _left_padded(prompts)
    new = 40  # positions cross several tile boundaries for every row
    with torch.no_grad():
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
        for i, p in enumerate(prompts):
            seq = out.sequences[i, ids.shape[1] :]
            full = model(torch.cat([torch.tensor(p, device="cuda"), seq])[None], use_cache=False).logits[0]
            got = torch.stack([lg[i] for lg in out.logits])
            torch.testing.assert_close(got, full[len(p) - 1 : len(p) - 1 + new].float(), rtol=1e-3, atol=1e-3)


def test_packed_prefill_equals_one_by_one() -> None:
    model = _model()
    prompts = _prompts([5, 33, 16, 1, 47])
    packed_cache, single_cache = model.new_cache(5, 128), model.new_cache(5, 128)
    slots = [4, 0, 2, 1, 3]
    packed = model.prefill(packed_cache, prompts, slots)
    single = torch.cat([model.prefill(single_cache, [p], [s]) for p, s in zip(prompts, slots, strict=True)])
    torch.testing.assert_close(packed, single, rtol=1e-4, atol=1e-4)
    # a chunked continuation (mid-tile) of two slots, then decode steps, both ways
    more = _prompts([9, 20], seed=1)
    a = model.prefill(packed_cache, more, [0, 3])
    b = torch.cat([model.prefill(single_cache, [m], [s]) for m, s in zip(more, [0, 3], strict=True)])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    toks = a.argmax(-1)
    after = [model.decode_step(toks, cache, [0, 3]) for cache in (packed_cache, single_cache)]
    torch.testing.assert_close(after[0], after[1], rtol=1e-4, atol=1e-4)


def _clone_cache(cache):
    from swrgen.models.cache import KVSlots, PhalanxSlots

    twin = type(cache)(cache.config, cache.num_slots, max_len=cache.max_len, device=cache.device, dtype=cache.dtype)
    for mine, theirs in zip(twin.layers, cache.layers, strict=True):
        if isinstance(mine, PhalanxSlots):
            mine.data.copy_(theirs.data)
        elif isinstance(mine, KVSlots):
            mine.keys.copy_(theirs.keys)
            mine.values.copy_(theirs.values)
    twin.pos.copy_(cache.pos)
    twin.host_pos = list(cache.host_pos)
    return twin


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indexed", [True, False])
def test_graph_replay_equals_eager_across_positions(dtype: torch.dtype, indexed: bool) -> None:
    from swrgen.models import DecodeGraph

    model = _model(dtype)
    prompts = _prompts([13, 30, 1, 16])
    eager = model.new_cache(4, 160)
    model.prefill(eager, prompts, [0, 1, 2, 3])
    graphed = _clone_cache(eager)
    graph = DecodeGraph(model, graphed, 4, indexed=indexed)
    assert graphed.pos.tolist() == eager.pos.tolist() == [13, 30, 1, 16]  # capturing left the cache as it was
    order = [2, 0, 3, 1] if indexed else [0, 1, 2, 3]
    toks = torch.tensor([prompts[s][-1] for s in order], device="cuda")
    for step in range(60):  # positions run through 16, 32, 48, 64 (every tile phase) in every slot
        want = model.decode_step(toks, eager, order)
        got = graph(toks, order) if indexed else graph(toks)
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, step=step: f"step {step}: {m}")
        toks = want.argmax(-1)  # both runs get the same tokens
        if indexed and step == 30:  # other slot ids: one copy into the graph's input buffer, the same graph
            new = [1, 3, 0, 2]
            toks = toks[[order.index(s) for s in new]]
            order = new
    assert graphed.pos.tolist() == eager.pos.tolist() == graphed.host_pos == eager.host_pos


def test_state_slots_with_graphs_equals_eager() -> None:
    from swrgen.models import StateSlots

    model = _model()
    prompts = _prompts([7, 19, 2, 33, 16])
    lengths = [12, 30, 20, 9, 25]

    def serve(graphs: bool) -> dict[int, list[int]]:
        slots = StateSlots(model, num_slots=3, max_len=96, cuda_graphs=graphs)
        pending, running, done, tick = list(range(len(prompts))), {}, {}, 0
        while pending or running:
            if pending and slots.free and tick % 4 == 0:
                (s,), logits = slots.join([prompts[pending[0]]], chunk_size=10)
                running[s] = (pending.pop(0), [int(logits[0].argmax())])
            if running:
                run = sorted(running)
                logits = slots.step(torch.tensor([running[s][1][-1] for s in run], device="cuda"), run)
                for s, row in zip(run, logits, strict=True):
                    running[s][1].append(int(row.argmax()))
                for s in run:
                    r, toks = running[s]
                    if len(toks) >= lengths[r]:
                        done[r] = toks
                        del running[s]
                        slots.leave(s)
            tick += 1
        return done

    assert serve(True) == serve(False)


def test_bench_sized_model_decodes_in_a_graph() -> None:
    """The 110M configuration of bench/serving/decode.py (48 Phalanx heads, 12 attention heads of 64), bf16."""
    from swrgen.models import DecodeGraph, PhalanxHybridConfig, PhalanxHybridForCausalLM

    torch.manual_seed(0)
    model = PhalanxHybridForCausalLM(PhalanxHybridConfig()).to(device="cuda", dtype=torch.bfloat16).eval()
    cache = model.new_cache(4, 64)
    first = model.prefill(cache, _prompts([5, 17, 31, 2]), [0, 1, 2, 3])
    twin = _clone_cache(cache)
    graph = DecodeGraph(model, twin, 4, indexed=False)
    toks = first.argmax(-1)
    for _ in range(20):
        want = model.decode_step(toks, cache)
        torch.testing.assert_close(graph(toks), want, **TOL[torch.bfloat16])
        toks = want.argmax(-1)
    with pytest.raises(ValueError, match="fixed max_len"):
        DecodeGraph(model, model.new_cache(2), 2)
