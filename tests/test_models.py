"""swrgen.models on the CPU: the Hugging Face Phalanx hybrid LM, its state-slot cache, generate(), continuous
batching, save/load, and Phalanx.from_spear. Float64 models (the torch reference paths), so a cached
decode must give what re-running the full forward gives, token for token.

The tests that need transformers skip without it (the `hf` extra); the import guard runs either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swrgen.nn import Phalanx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny float64 matmuls: one thread is much faster than two fighting over a busy machine's cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_import_without_transformers_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` fail
        "import swrgen, swrgen.models\n"
        "try:\n    swrgen.models.PhalanxHybridForCausalLM\n"
        "except ImportError as e:\n    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ERR" in done.stdout and "swrgen[hf]" in done.stdout, done.stdout


def test_decode_benchmark_help_and_no_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.serving import decode

    with pytest.raises(SystemExit) as exc:
        decode.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"bench/serving/decode\.py needs a CUDA device"):
        decode.main([])
    done = subprocess.run([sys.executable, "bench/serving/decode.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


# ---------------------------------------------------------------- Phalanx.from_spear


def _spear_state_dict(dim: int, heads: int, kv_heads: int, head_dim: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    return {
        "param.proj_a.weight": r(heads, dim), "param.proj_a.bias": r(heads),
        "param.proj_b.weight": r(kv_heads * head_dim, dim), "param.proj_b.bias": r(kv_heads * head_dim),
        "param.proj_c.weight": r(kv_heads * head_dim, dim), "param.proj_c.bias": r(kv_heads * head_dim),
        "param.proj_v.weight": r(heads * head_dim, dim), "proj_out.weight": r(dim, heads * head_dim),
    }  # fmt: skip


def _spear_formula(sd: dict, x: torch.Tensor, k: int = 2, bl: int = 16) -> torch.Tensor:
    """spear's Phalanx written out: sigmoid gates, KV heads repeated, the jagged window summed term by term."""
    p = {key.removeprefix("param."): v for key, v in sd.items()}
    heads = p["proj_a.weight"].shape[0]
    head_dim = p["proj_v.weight"].shape[0] // heads
    kv_heads = p["proj_b.weight"].shape[0] // head_dim
    batch, length, _ = x.shape

    def kv(t: torch.Tensor) -> torch.Tensor:  # [B, L, KVH*DH] -> [B, L, H, DH], head h reads kv head h // groups
        return t.view(batch, length, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=2)

    a = torch.sigmoid(x @ p["proj_a.weight"].T + p["proj_a.bias"])  # [B, L, H]
    b = kv(torch.sigmoid(x @ p["proj_b.weight"].T + p["proj_b.bias"]))
    c = kv(x @ p["proj_c.weight"].T + p["proj_c.bias"])
    v = (x @ p["proj_v.weight"].T).view(batch, length, heads, head_dim)
    u = b * v
    y = torch.zeros_like(u)
    for t in range(length):
        for s in range(max(0, (t // bl - k + 1) * bl), t + 1):
            y[:, t] += a[:, s + 1 : t + 1].prod(dim=1)[..., None] * u[:, s]
    z = (y * c + v).reshape(batch, length, heads * head_dim)
    return z @ p["proj_out.weight"].T


@pytest.mark.parametrize(("dim", "heads", "kv_heads", "k"), [(64, 4, 4, 2), (48, 6, 2, 2), (32, 2, 1, 3)])
def test_from_spear_matches_spear_formula(dim: int, heads: int, kv_heads: int, k: int) -> None:
    sd = _spear_state_dict(dim, heads, kv_heads)
    layer = Phalanx.from_spear(sd, window_blocks=k)
    assert (layer.dim, layer.heads, layer.head_dim, layer.kv_heads) == (dim, heads, 16, kv_heads)
    assert layer.decay_max == 1.0 and layer.in_proj.bias is not None and layer.out_proj.bias is None
    assert torch.equal(layer.in_proj.bias[-heads * 16 :], torch.zeros(heads * 16, dtype=torch.float64))
    x = torch.randn(2, 53, dim, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _spear_formula(sd, x, k=k), rtol=1e-10, atol=1e-10)


def test_from_spear_prefixless_keys_and_errors() -> None:
    sd = _spear_state_dict(32, 2, 2)
    plain = {key.removeprefix("param."): v for key, v in sd.items()}
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(Phalanx.from_spear(plain)(x), Phalanx.from_spear(sd)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"missing \['proj_a.bias'\]"):
        Phalanx.from_spear({k: v for k, v in sd.items() if k != "param.proj_a.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        Phalanx.from_spear({**sd, "param.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"proj_out\.weight has shape"):
        Phalanx.from_spear({**sd, "proj_out.weight": torch.zeros(32, 16)})
    with pytest.raises(ValueError, match="contradicts"):
        Phalanx.from_spear(sd, heads=4)
    with pytest.raises(ValueError, match="set by the state dict"):
        Phalanx.from_spear(sd, bias=True)


def test_phalanx_bias_defaults_unchanged() -> None:
    assert Phalanx(32).in_proj.bias is None and Phalanx(32).out_proj.bias is None
    assert Phalanx(32, bias=True).in_proj.bias is not None and Phalanx(32, bias=True).out_proj.bias is not None
    layer = Phalanx(32, in_proj_bias=True)
    assert layer.in_proj.bias is not None and layer.out_proj.bias is None
    with pytest.raises(ValueError, match="in_proj_bias"):
        Phalanx(32, in_proj_bias=1)


# ---------------------------------------------------------------- the HF model (needs transformers)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def _config(layer_types=None, **kw):
    from swrgen.models import PhalanxHybridConfig

    base = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, phalanx_kv_heads=1, initializer_range=0.3, pad_token_id=0,
                layer_types=layer_types, sliding_window=7)  # fmt: skip
    return PhalanxHybridConfig(**{**base, **kw})


LAYER_SETS = {
    "hybrid": None,  # phalanx, phalanx, full_attention
    "with_swa": ["phalanx", "sliding_attention", "full_attention", "phalanx"],
}


def _model(layer_types=None, seed: int = 0, **kw):
    from swrgen.models import PhalanxHybridForCausalLM

    torch.manual_seed(seed)
    if layer_types is not None:
        kw["num_hidden_layers"] = len(layer_types)
    cfg = _config(layer_types, **kw)
    return PhalanxHybridForCausalLM(cfg).to(torch.float64).eval()


def _full_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens by re-running the whole forward (no cache) for every new token, and the logits."""
    seq, toks, logits = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(n):
            lg = model(seq, use_cache=False).logits[0, -1]
            logits.append(lg)
            toks.append(int(lg.argmax()))
            seq = torch.cat([seq, torch.tensor([[toks[-1]]])], dim=1)
    return toks, logits


PROMPT_LENGTHS = [1, 5, 15, 16, 17, 33]  # with 14 new tokens: every tile phase, boundaries 16, 32, 48


def test_config_defaults_are_the_bench_hybrid(hf) -> None:
    from bench.models.hybrid import DIM, GLOBAL_EVERY, LAYERS, VOCAB
    from swrgen.models import PhalanxHybridConfig, PhalanxHybridForCausalLM

    cfg = PhalanxHybridConfig()
    sizes = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size)
    assert sizes == (VOCAB, DIM, LAYERS, 4 * DIM)
    globals_ = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert globals_ == list(range(GLOBAL_EVERY - 1, LAYERS, GLOBAL_EVERY))  # 2, 5, 8, 11
    assert cfg.head_dim == 64 and cfg.phalanx_head_dim == 16 and cfg.window_blocks == 2 and cfg.tie_word_embeddings
    with torch.device("meta"):
        params = sum(p.numel() for p in PhalanxHybridForCausalLM(cfg).parameters())
    assert 105e6 < params < 115e6, params
    with pytest.raises(ValueError, match="layer_types"):
        PhalanxHybridConfig(layer_types=["phalanx", "mamba"], num_hidden_layers=2)
    with pytest.raises(ValueError, match="sliding_window"):
        PhalanxHybridConfig(layer_types=["sliding_attention"], num_hidden_layers=1)


@pytest.mark.parametrize("layers", sorted(LAYER_SETS))
def test_generate_equals_full_forward(hf, layers: str) -> None:
    model = _model(LAYER_SETS[layers])
    g = torch.Generator().manual_seed(1)
    seen: set[int] = set()
    for length in PROMPT_LENGTHS:
        prompt = torch.randint(1, 97, (length,), generator=g).tolist()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)  # fmt: skip
        want, want_logits = _full_greedy(model, prompt, 14)
        assert out.sequences[0, length:].tolist() == want, f"prompt length {length}"
        # generate() hands out float32 logits; the state pools are float32 too (the rest float64)
        torch.testing.assert_close(torch.stack([lg[0] for lg in out.logits]), torch.stack(want_logits).float(),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        seen.update(want)
    assert len(seen) > 12  # the test model does not just repeat a few tokens


def test_generate_left_padded_batch_equals_each_alone(hf) -> None:
    model = _model(LAYER_SETS["with_swa"])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    for i, p in enumerate(prompts):
        assert out[i, width:].tolist() == _full_greedy(model, p, 14)[0], f"row {i} (prompt length {len(p)})"


def test_generate_without_cache_and_beam_search_agree(hf) -> None:
    model = _model()
    prompt = torch.randint(1, 97, (1, 19), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, max_new_tokens=15, do_sample=False)
    plain = model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    beams = model.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=3)
    beams_plain = model.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(beams, beams_plain)  # reorder_cache moves the state slots with the beams


def test_padding_anywhere_is_each_sequence_alone(hf) -> None:
    model = _model(LAYER_SETS["with_swa"])
    a, b = torch.randint(1, 97, (21,)), torch.randint(1, 97, (9,))
    ids = torch.zeros(2, 21, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, :9], mask[1, :9] = b, 1  # right padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(out[0], model(a[None]).logits[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1, :9], model(b[None]).logits[0], rtol=1e-12, atol=1e-12)


def test_chunked_prefill_through_the_cache(hf) -> None:
    from swrgen.models import PhalanxHybridCache
    from swrgen.models.modeling_phalanx_hybrid import CACHE_FIELD

    model = _model(LAYER_SETS["with_swa"])
    ids = torch.randint(1, 97, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        cache = PhalanxHybridCache(model.config, 2, dtype=torch.float64)
        got = []
        for lo, hi in [(0, 7), (7, 20), (20, 21), (21, 32), (32, 45)]:  # mid-tile starts, a 1-token step
            out = model(ids[:, lo:hi], past_key_values=cache, use_cache=True)
            assert getattr(out, CACHE_FIELD) is cache
            got.append(out.logits)
    assert cache.host_pos == [45, 45] and cache.pos.tolist() == [45, 45] and cache.get_seq_length() == 45
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-6, atol=1e-6)


def test_labels_loss_and_backward(hf) -> None:
    from swrgen.models.modeling_phalanx_hybrid import CACHE_FIELD

    model = _model().train()
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    assert getattr(out, CACHE_FIELD) is None  # training: no cache by default
    logits = out.logits[:, :-1].reshape(-1, 97)
    ref = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref.float())  # transformers computes the loss in float32
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_save_and_load_pretrained(hf, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from swrgen.models import PhalanxHybridForCausalLM

    model = _model(LAYER_SETS["with_swa"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    ids = torch.randint(1, 97, (1, 25))
    for cls in (PhalanxHybridForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path, dtype=torch.float64).eval()
        assert isinstance(loaded, PhalanxHybridForCausalLM)
        assert loaded.config.layer_types == model.config.layer_types
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(p, q), name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cache_rejects_foreign_caches_and_position_ids(hf) -> None:
    from transformers import DynamicCache

    model = _model()
    ids = torch.randint(1, 97, (1, 5))
    with pytest.raises(TypeError, match="PhalanxHybridCache"):
        model(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])
    cache = model.new_cache(2, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model.prefill(cache, [list(range(1, 10))], [0])
    with pytest.raises(ValueError, match="slot 5"):
        model.prefill(cache, [[1, 2]], [5])


def test_prefill_and_decode_step_on_any_slots(hf) -> None:
    model = _model(LAYER_SETS["with_swa"])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (13, 3, 30)]
    cache = model.new_cache(5, max_len=64)
    slots = [3, 0, 4]
    logits = model.prefill(cache, prompts, slots)  # one packed pass
    toks = {s: [int(lg.argmax())] for s, lg in zip(slots, logits, strict=True)}
    for step in range(14):
        run = [4, 3] if step % 2 else [0, 4, 3]  # a changing subset, in any order
        lg = model.decode_step(torch.tensor([toks[s][-1] for s in run]), cache, run)
        for s, row in zip(run, lg, strict=True):
            toks[s].append(int(row.argmax()))
    for s, p in zip(slots, prompts, strict=True):
        assert toks[s] == _full_greedy(model, p, len(toks[s]))[0], f"slot {s}"
    seen = [len(p) + len(toks[s]) - 1 for s, p in zip(slots, prompts, strict=True)]  # the last token is not fed
    assert [cache.host_pos[s] for s in slots] == seen
    assert cache.pos.tolist() == cache.host_pos


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_state_slots_interleaved_joins_and_leaves(hf, chunk_size: int | None) -> None:
    from swrgen.models import StateSlots

    model = _model(LAYER_SETS["with_swa"])
    g = torch.Generator().manual_seed(6)
    # (prompt length, tokens to generate): more requests than slots, finishing at different times
    spec = [(5, 14), (17, 9), (1, 16), (33, 12), (16, 15), (2, 7), (40, 5)]
    requests = [(torch.randint(1, 97, (n,), generator=g).tolist(), m) for n, m in spec]
    slots = StateSlots(model, num_slots=3, max_len=80)
    pending, running, done, tick = list(range(len(requests))), {}, {}, 0
    while pending or running:
        if pending and slots.free and tick % 3 == 0:  # joins arrive while others decode
            n = min(len(slots.free), 2, len(pending))
            joined, logits = slots.join([requests[r][0] for r in pending[:n]], chunk_size=chunk_size)
            for s, r, lg in zip(joined, pending[:n], logits, strict=True):
                running[s] = (r, [int(lg.argmax())])
            pending = pending[n:]
        if running:
            run = sorted(running)
            lg = slots.step(torch.tensor([running[s][1][-1] for s in run]), run)
            for s, row in zip(run, lg, strict=True):
                running[s][1].append(int(row.argmax()))
            for s in run:
                r, toks = running[s]
                if len(toks) >= requests[r][1]:
                    done[r] = toks[: requests[r][1]]
                    del running[s]
                    slots.leave(s)
        tick += 1
    assert sorted(slots.free) == [0, 1, 2] and not slots.active
    for r, (prompt, n) in enumerate(requests):
        assert done[r] == _full_greedy(model, prompt, n)[0], f"request {r}"
    with pytest.raises(ValueError, match="hold no running request"):
        slots.step(torch.tensor([1]), [0])
    slots.join([[1, 2, 3]] * 3)
    with pytest.raises(RuntimeError, match="free"):
        slots.join([[1]])


def test_cache_bytes_per_slot(hf) -> None:
    from swrgen.models import PhalanxHybridCache, PhalanxHybridConfig

    cfg = PhalanxHybridConfig()
    cache = PhalanxHybridCache(cfg, 1, max_len=4096, device="meta", dtype=torch.bfloat16)
    sizes = cache.nbytes_per_slot()
    assert sizes["phalanx_state"] == 8 * 48 * 16 * 4 * 4  # 8 layers x H x DH x [w, g, v, P] float32
    assert sizes["attention_kv"] == 4 * 2 * 12 * 64 * 2 * 4096  # 4 global layers of K and V, bf16


def test_decode_benchmark_smoke_on_cpu(hf, tmp_path: Path) -> None:
    import json

    from bench.serving import decode

    out = tmp_path / "decode.json"
    assert decode.main(["--smoke", "--device", "cpu", "--steps", "2", "--repeats", "1", "--layer-batch", "4",
                        "--batches", "2", "--contexts", "20", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert {r["local"] for r in result["decode"]} == {"phalanx", "swa512", "causal"}
    assert all(r["eager_tokens_per_s"] > 0 for r in result["decode"])
    assert result["layers"][0]["phalanx_decode__ms"] > 0
    with pytest.raises(SystemExit, match="--smoke"):
        decode.main(["--device", "cpu"])
