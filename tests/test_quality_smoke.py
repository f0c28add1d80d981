"""CPU checks of bench/quality.py: the smoke run's JSON, merging, the data split and the SWA masks."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


def _load_module():
    # By path, so nothing else under bench/ is imported.
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load_module()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quality") / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=SCRIPT.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_smoke_runs_all_three_models_on_equal_tokens(smoke: tuple[dict, Path]) -> None:
    results, out = smoke
    cfg, runs = results["config"], results["runs"]
    assert results["schema"] == quality.SCHEMA
    assert [r["model"] for r in runs] == ["phalanx_k2", "swa", "causal"]
    step_tokens = cfg["batch"] * cfg["context"]
    for r in runs:
        assert r["complete"] and r["finite"], r["model"]
        assert r["tokens_trained"] == cfg["steps"] * step_tokens
        assert [p["tokens"] for p in r["curve"]] == [p["step"] * step_tokens for p in r["curve"]]
        assert r["curve"][0]["tokens"] == 0 and r["curve"][-1]["tokens"] == r["tokens_trained"]
        for p in r["curve"]:
            assert math.isfinite(p["val_loss"]) and p["val_loss"] > 0
            assert p["train_loss"] is None or math.isfinite(p["train_loss"])
            assert p["val_ppl"] == pytest.approx(math.exp(p["val_loss"]))
        assert r["curve"][-1]["val_loss"] < r["curve"][0]["val_loss"] - 0.3, r["model"]  # it learned something
        assert r["timed_steps"] == cfg["steps"] - cfg["warmup_steps"]
        assert r["train_tokens_per_s"] > 0 and r["timed_s"] > 0 and r["wall_s"] >= r["timed_s"]
        assert r["params"]["total"] > r["params"]["local_mixers"] > 0
    # same data in the same order, and the same validation sample, for every model
    assert len({r["tokens_trained"] for r in runs}) == 1
    assert len({r["data_order_sha256"] for r in runs}) == 1
    assert len({r["val_sample_sha256"] for r in runs}) == 1
    assert [r["layout"] for r in runs] == [["phalanx", "phalanx", "causal"], ["swa", "swa", "causal"],
                                           ["causal"] * 3]  # fmt: skip
    # the models differ only in the local mixers: their parameter counts stay within 5%
    totals = [r["params"]["total"] for r in runs]
    assert max(totals) / min(totals) < 1.05
    (row,) = results["comparison"]["rows"]
    assert row["model"] == "phalanx_k2" and math.isfinite(row["vs_swa"]["loss_rel"])
    assert row["vs_swa"]["throughput_rel"] is not None and "vs_causal" in row
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0


def test_smoke_data_split_is_disjoint_by_file(smoke: tuple[dict, Path]) -> None:
    data = smoke[0]["data"]
    train, val = data["files"]["train"], data["files"]["val"]
    assert train and val and not set(train) & set(val)
    assert len(train) == data["train_files"] and len(val) == data["val_files"]
    assert train == sorted(train) and val == sorted(val)
    assert data["val_bytes"] >= data["options"]["val_fraction"] * (data["train_bytes"] + data["val_bytes"])
    assert data["train_bytes"] + data["val_bytes"] <= data["options"]["max_bytes"]
    assert data["train_tokens"] == data["train_bytes"] + data["train_files"]  # one separator per file
    assert [r["label"] for r in data["roots"]] == ["stdlib"] and data["stdlib"] is True
    assert sum(r["files"] for r in data["roots"]) == len(train) + len(val)
    assert all(k.startswith("stdlib/") for k in train + val)
    assert set(data["rules"]) >= {"files", "cap", "split", "stream", "train_order", "val_sample"}


def test_merge_of_single_model_files_equals_the_combined_run(smoke: tuple[dict, Path], tmp_path: Path) -> None:
    results = smoke[0]
    paths = []
    for run in results["runs"]:
        path = tmp_path / f"{run['model']}.json"
        path.write_text(json.dumps({**results, "runs": [run], "comparison": quality.compare([run])}))
        paths.append(path)
    merged_path = tmp_path / "merged.json"
    assert quality.main(["--merge", *map(str, paths), "--out", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert [r["model"] for r in merged["runs"]] == [r["model"] for r in results["runs"]]
    assert merged["comparison"] == results["comparison"]
    with pytest.raises(ValueError, match="appears twice"):
        quality.merge([paths[0], paths[0]])
    other = json.loads(paths[1].read_text())
    other["config"]["lr"] *= 2
    paths[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"configuration differs .*\['lr'\]"):
        quality.merge(paths)


def test_collect_corpus_rules(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / ".hidden").mkdir()
    texts = {f"m{i:02d}.py": f"# module {i}\n" + "x = 1\n" * (10 + 7 * i) for i in range(30)}
    texts["sub/README.md"] = "# readme\n" * 40
    texts["sub/notes.rst"] = "notes\n=====\n" * 20
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "nul.py").write_bytes(b"a\0b")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.py").write_text("")
    (root / "big.py").write_text("y" * 5000)
    (root / "ext.so").write_bytes(b"\x7fELF")
    (root / "__pycache__" / "m00.py").write_text("skipped")
    (root / ".hidden" / "h.py").write_text("skipped")
    (root / "link.py").symlink_to(root / "m00.py")
    roots = [quality.Root("pkg", root, None)]

    corpus = quality.collect_corpus(roots, max_bytes=10**7, max_file_bytes=4096, val_fraction=0.1)
    rep = corpus.report
    assert rep["skipped_files"] == {"empty": 1, "too_large": 1, "symlink": 1, "duplicate": 0, "unreadable": 0,
                                    "not_utf8_or_nul": 2, "over_cap": 0}  # fmt: skip
    keys = {f"pkg/{name}" for name in texts}
    train, val = set(rep["files"]["train"]), set(rep["files"]["val"])
    assert train | val == keys and not train & val and val
    total = sum(len(t) for t in texts.values())
    assert rep["val_bytes"] >= 0.1 * total and rep["train_bytes"] + rep["val_bytes"] == total
    # each split's stream is its files in sorted order, each followed by the separator byte
    sep = bytes([quality.SEPARATOR])
    for split, stream in (("train", corpus.train), ("val", corpus.val)):
        expect = b"".join(texts[k.split("/", 1)[1]].encode() + sep for k in rep["files"][split])
        assert bytes(stream.numpy()) == expect
    again = quality.collect_corpus(roots, max_bytes=10**7, max_file_bytes=4096, val_fraction=0.1)
    assert again.report["sha256"] == rep["sha256"] and again.report["files"] == rep["files"]

    capped = quality.collect_corpus(roots, max_bytes=total // 2, max_file_bytes=4096, val_fraction=0.1)
    kept = set(capped.report["files"]["train"]) | set(capped.report["files"]["val"])
    assert kept < keys and capped.report["skipped_files"]["over_cap"] > 0
    assert capped.report["train_bytes"] + capped.report["val_bytes"] <= total // 2


def test_train_schedule_and_val_sample() -> None:
    starts, epochs = quality.train_schedule(n_tokens=10 * 64 + 1, context=64, batch=4, steps=5, seed=3)
    assert starts.shape == (5, 4) and epochs == 2.0
    assert torch.equal(starts, quality.train_schedule(10 * 64 + 1, 64, 4, 5, seed=3)[0])
    assert not torch.equal(starts, quality.train_schedule(10 * 64 + 1, 64, 4, 5, seed=4)[0])
    flat = starts.flatten()
    assert sorted(flat[:10].tolist()) == [64 * i for i in range(10)]  # one epoch = every window once
    assert sorted(flat[10:].tolist()) == [64 * i for i in range(10)]
    with pytest.raises(ValueError, match="a batch needs"):
        quality.train_schedule(3 * 64 + 1, 64, 4, 1, seed=0)
    val = torch.arange(1000) % 251
    sample = quality.val_sample(val.to(torch.uint8), context=64, val_tokens=300, batch=4)
    assert sample.shape == (8, 65)  # ceil(300 / 64) = 5 windows, rounded up to a multiple of the batch
    assert torch.equal(sample[0], val[:65].to(torch.uint8)) and torch.equal(sample[-1], val[-65:].to(torch.uint8))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_the_sdpa_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(quality, "_compiled_flex", lambda: flex_attention)  # eager: no compile on CPU
    torch.manual_seed(0)
    dim, head_dim, context, window = 64, 32, 256, 48
    rope = quality.Rotary(head_dim, context)
    sdpa = quality.Attention(dim, head_dim, rope, quality.window_mask(window, context, torch.device("cpu"), "sdpa"))
    flex = quality.Attention(dim, head_dim, rope, quality.window_mask(window, context, torch.device("cpu"), "flex"))
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, context, dim)
    with torch.no_grad():
        torch.testing.assert_close(flex(x), sdpa(x), rtol=1e-4, atol=1e-5)
        # and the window matters: full causal attention differs
        causal = quality.Attention(dim, head_dim, rope, None)
        causal.load_state_dict(sdpa.state_dict())
        assert not torch.allclose(causal(x), sdpa(x), atol=1e-3)
        assert torch.allclose(causal(x)[:, :window], sdpa(x)[:, :window], atol=1e-5)


def test_non_finite_loss_exits_non_zero(tmp_path: Path) -> None:
    out = tmp_path / "nan.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--model", "causal", "--lr", "1e30", "--out",
                           str(out), "--plot", str(tmp_path / "nan.png")], capture_output=True, text=True,
                          timeout=600, cwd=SCRIPT.parents[1])  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    cfg = results["config"]
    assert not run["finite"] and not run["complete"]
    assert run["tokens_trained"] < cfg["steps"] * cfg["batch"] * cfg["context"]  # it stopped early


def test_data_report_only_collects(capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--smoke", "--data-report"]) == 0
    text = capsys.readouterr().out
    assert "stdlib" in text and "train:" in text and "step" not in text


@pytest.mark.parametrize("local", ["phalanx", "swa", "causal"])
def test_models_are_causal(local: str) -> None:
    """A next-byte model must not see the byte it predicts: changing token t changes no logit before t (a leak
    would make a mixer's validation loss look better than it is), and does change the logits from t on."""
    cfg, _ = quality.resolve_config(quality.parse_args(["--smoke", "--swa-impl", "sdpa"]))
    torch.manual_seed(0)
    model = quality.HybridLM(cfg, local, 2, torch.device("cpu")).eval()
    length, t = 100, 57  # not a multiple of the block length; t mid-tile
    seq = torch.randint(0, quality.VOCAB, (2, length))
    other = seq.clone()
    other[:, t] = (seq[:, t] + 1) % quality.VOCAB
    with torch.no_grad():
        a, b = model(seq), model(other)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-4
