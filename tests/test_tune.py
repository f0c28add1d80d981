"""Autotuner (space, buckets, store, CLI) and benchmark helpers, on the CPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from swrgen import cli, constants
from swrgen.ops.swr.reference import swr_reference
from swrgen.spec import SpecError, default_spec, staging
from swrgen.tune import buckets, search, space, store

BASE = default_spec(window_blocks=2)
WINNER = {"warps_per_cta": 8, "tiles_per_warp": 128, "tiles_in_flight": 4, "cluster_size": 1, "persistent": True}
SHAPE = (4, 64, 16, 8192)


@pytest.fixture(autouse=True)
def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test: its own cache dir (so its own tuned/ folder), no shipped configs, an empty memo."""
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(store.ENV_DISABLE, raising=False)
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    store.clear_memo()
    yield
    store.clear_memo()


def entry(target: dict | None = None) -> dict:
    return {"target": dict(target or WINNER), "fwd_ms": 0.1, "bwd_ms": 0.2, "objective": "train"}


# ------------------------------------------------------------------ space


def test_candidates_all_validate_baseline_first_no_duplicates() -> None:
    cands = space.candidates(BASE, "sm_90a")
    assert cands[0] == space.current(BASE)
    keys = [tuple(c[k] for k in space.TUNABLE) for c in cands]
    assert len(keys) == len(set(keys))
    for c in cands:
        BASE.replace_target(**c)  # never raises
    # default grid for BL=16 on a cluster arch: 3 warps x 4 tiles x 4 in-flight x 2 clusters x 2 persistent
    # with registers staging, plus shared staging where both stage rings fit the archs' shared memory
    limit = staging.max_shared_bytes(BASE.target.archs)
    fits = [(w, f, n) for w in (2, 4, 8) for f in (1, 2, 4, 8) for n in (2, 3)
            if all(staging.layout(d, BASE.recurrence, f, w, n).cta_bytes <= limit for d in ("fwd", "bwd"))]  # fmt: skip
    assert 0 < len(fits) < 30  # the limit takes some out
    assert len(cands) == 3 * 4 * 4 * 2 * 2 + len(fits) * 4 * 2 * 2
    assert {c["staging"] for c in cands} == {"registers", "shared"}


def test_candidates_respect_register_budget() -> None:
    spec = default_spec(block_len=64)  # 32 tokens per lane: only 1 or 2 tiles in flight fit
    cands = [c for c in space.candidates(spec, "sm_90a") if c["staging"] == "registers"]
    assert cands and {c["tiles_in_flight"] for c in cands} == {1, 2}
    fitting = constants.MAX_TOKENS_IN_FLIGHT_PER_LANE // constants.tokens_per_lane(64)
    assert all(c["tiles_in_flight"] <= fitting for c in cands)


def test_no_clusters_where_there_are_none() -> None:
    assert {c["cluster_size"] for c in space.candidates(BASE, "sm_80")} == {1}
    both = BASE.replace_target(archs=("sm_80", "sm_90a"))  # a cluster would fail validation for sm_80
    assert {c["cluster_size"] for c in space.candidates(both, "sm_90a")} == {1}
    assert {c["cluster_size"] for c in space.candidates(BASE, "sm_90a")} == {1, 2}


def test_grid_override_and_invalid_values_filtered() -> None:
    grid = space.parse_grid("warps_per_cta=3,4 ; tiles_per_warp=64 ;persistent=true")
    assert grid == {"warps_per_cta": (3, 4), "tiles_per_warp": (64,), "persistent": (True,)}
    cands = space.candidates(BASE, "sm_90a", grid)
    assert all(c["warps_per_cta"] != 3 for c in cands)  # 3 warps per CTA is not an allowed value
    assert {c["warps_per_cta"] for c in cands[1:]} == {4}
    assert {c["persistent"] for c in cands[1:]} == {True}


@pytest.mark.parametrize("text", ["bogus=1", "warps_per_cta", "warps_per_cta=", "tiles_per_warp=abc"])
def test_parse_grid_errors(text: str) -> None:
    with pytest.raises(ValueError):
        space.parse_grid(text)


def test_describe() -> None:
    cand = {"warps_per_cta": 4, "tiles_per_warp": 64, "tiles_in_flight": 2, "cluster_size": 1, "persistent": False}
    assert space.describe(cand) == "W=4 T=64  F=2 C=1 P=0"


# ------------------------------------------------------------------ buckets


@pytest.mark.parametrize(("n", "want"), [(0, 0), (1, 1), (2, 2), (3, 2), (255, 128), (256, 256), (511, 256)])
def test_pow2_floor(n: int, want: int) -> None:
    assert buckets.pow2_floor(n) == want


def test_bucket_of() -> None:
    assert buckets.bucket_of((4, 64, 16, 8192)) == (256, 8192)
    assert buckets.bucket_of((1, 256, 16, 16383)) == (256, 8192)  # same grid, same bucket
    assert buckets.bucket_of((4, 64, 32, 8192)) == (512, 8192)  # 2 warp rows per head
    assert buckets.bucket_of((8, 64, 16, 2048)) == (512, 2048)
    assert buckets.bucket_name((256, 8192)) == "rows256/L8192"


# ------------------------------------------------------------------ store


def test_round_trip() -> None:
    assert store.lookup(BASE, "sm_90a", SHAPE) is None
    path = store.save(BASE, "sm_90a", SHAPE, entry())
    assert path.parent == store.tuned_dir() and path.is_file()
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    assert store.lookup(BASE, "sm_90a", (1, 256, 16, 12000)) == WINNER  # same bucket
    assert store.lookup(BASE, "sm_90a", (4, 64, 16, 4096)) is None  # other L bucket
    assert store.lookup(BASE, "sm_80", SHAPE) is None  # other arch
    # Same recurrence, other target: same file (the target is what gets tuned); other recurrence: not.
    assert store.lookup(BASE.replace_target(warps_per_cta=2), "sm_90a", SHAPE) == WINNER
    assert store.lookup(default_spec(window_blocks=3), "sm_90a", SHAPE) is None
    data = json.loads(path.read_text())
    assert data["version"] == store.VERSION and data["recurrence"] == BASE.recurrence.to_dict()
    assert list(data["entries"]) == [f"sm_90a/nvrtc{store.compiler_version()}/rows256/L8192"]


def test_save_keeps_other_entries_and_returns_copies() -> None:
    store.save(BASE, "sm_90a", SHAPE, entry())
    other = dict(WINNER, warps_per_cta=2)
    store.save(BASE, "sm_90a", (8, 64, 16, 2048), entry(other))
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    got = store.lookup(BASE, "sm_90a", (8, 64, 16, 2048))
    assert got == other
    got["warps_per_cta"] = 32  # the caller's copy; the memo is untouched
    assert store.lookup(BASE, "sm_90a", (8, 64, 16, 2048)) == other


def test_device_tag() -> None:
    assert store.device_tag("NVIDIA H100 80GB HBM3") == "H100_80GB_HBM3"
    assert store.device_tag("NVIDIA H200") == "H200"
    assert store.device_tag("NVIDIA GeForce RTX 4090") == "GeForce_RTX_4090"
    assert store.device_tag("") == "unknown"


def test_card_entries_win_over_the_arch_in_every_directory() -> None:
    h100, h200 = dict(WINNER, warps_per_cta=2), dict(WINNER, warps_per_cta=1)
    store.save(BASE, "sm_90a", SHAPE, entry(h100), directory=store.SHIPPED_DIR, device="H100_80GB_HBM3")
    data = json.loads(store.file_path(BASE, store.SHIPPED_DIR).read_text())
    version = store.compiler_version()
    assert set(data["entries"]) == {f"sm_90a/nvrtc{version}/rows256/L8192",
                                    f"sm_90a/H100_80GB_HBM3/nvrtc{version}/rows256/L8192"}  # fmt: skip
    assert store.lookup(BASE, "sm_90a", SHAPE, device="H100_80GB_HBM3") == h100
    assert store.lookup(BASE, "sm_90a", SHAPE, device="H200") == h100  # another card: the arch's entry
    assert store.lookup(BASE, "sm_90a", SHAPE) == h100
    # A local tuning run on an H200 writes its card's key and the arch's: the H200 takes its own, the H100
    # still its own shipped entry (card before directory), a third card the local arch entry.
    store.save(BASE, "sm_90a", SHAPE, entry(h200), device="H200")
    assert store.lookup(BASE, "sm_90a", SHAPE, device="H200") == h200
    assert store.lookup(BASE, "sm_90a", SHAPE, device="H100_80GB_HBM3") == h100
    assert store.lookup(BASE, "sm_90a", SHAPE, device="H800") == h200


def test_lookup_filters_targets_the_spec_rejects() -> None:
    store.save(BASE, "sm_90a", SHAPE, entry(dict(WINNER, cluster_size=2)))
    assert store.lookup(BASE, "sm_90a", SHAPE)["cluster_size"] == 2
    mixed = BASE.replace_target(archs=("sm_80", "sm_90a"))  # clusters invalid for this spec
    assert store.lookup(mixed, "sm_90a", SHAPE) is None


def test_save_rejects_bad_entries() -> None:
    for bad in ({}, {"target": {}}, {"target": {"warps_per_cta": True}}, {"target": {"nope": 1}}):
        with pytest.raises(ValueError):
            store.save(BASE, "sm_90a", SHAPE, bad)


def test_atomic_write_leaves_old_file_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    path = store.save(BASE, "sm_90a", SHAPE, entry())
    before = path.read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.json, "dump", broken_dump)
    with pytest.raises(OSError):
        store.save(BASE, "sm_90a", (8, 64, 16, 2048), entry())
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 99, "entries": {}}', ""])
def test_corrupt_file_ignored_then_rewritten(content: str) -> None:
    path = store.file_path(BASE)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert store.lookup(BASE, "sm_90a", SHAPE) is None
    store.save(BASE, "sm_90a", SHAPE, entry())
    assert json.loads(path.read_text())["version"] == store.VERSION
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER


def test_malformed_entry_ignored_alone() -> None:
    path = store.save(BASE, "sm_90a", SHAPE, entry())
    data = json.loads(path.read_text())
    key = next(iter(data["entries"]))
    bad_key = key.replace("rows256", "rows512")
    data["entries"][bad_key] = {"target": {"warps_per_cta": "8"}}
    path.write_text(json.dumps(data))
    store.clear_memo()
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    assert store.lookup(BASE, "sm_90a", (8, 64, 16, 8192)) is None


def test_file_of_another_recurrence_ignored() -> None:
    path = store.save(BASE, "sm_90a", SHAPE, entry())
    data = json.loads(path.read_text())
    data["recurrence_hash"] = "0" * 64
    path.write_text(json.dumps(data))
    store.clear_memo()
    assert store.lookup(BASE, "sm_90a", SHAPE) is None


def test_lookup_memoized(monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(BASE, "sm_90a", SHAPE, entry())
    reads = []
    real = store.read_file
    monkeypatch.setattr(store, "read_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    for _ in range(100):
        assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    assert len(reads) == 1  # the user dir's file, once (the shipped dir has none: memoized as well)
    store.file_path(BASE).unlink()
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER  # in-process memo, no file access
    store.clear_memo()
    assert store.lookup(BASE, "sm_90a", SHAPE) is None
    t0 = time.perf_counter()
    for _ in range(2000):
        store.lookup(BASE, "sm_90a", SHAPE)
    assert (time.perf_counter() - t0) / 2000 < 50e-6  # cheap enough for the launch path (~1 us here)


def test_cache_dir_change_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(BASE, "sm_90a", SHAPE, entry())
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER  # the environment is read once ...
    store.clear_memo()
    assert store.lookup(BASE, "sm_90a", SHAPE) is None  # ... until the memo is cleared


def test_shipped_dir_consulted_after_user_dir(tmp_path: Path) -> None:
    store.save(BASE, "sm_90a", SHAPE, entry(dict(WINNER, warps_per_cta=2)), directory=store.SHIPPED_DIR)
    assert store.lookup(BASE, "sm_90a", SHAPE)["warps_per_cta"] == 2
    store.save(BASE, "sm_90a", SHAPE, entry())
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER


def test_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(BASE, "sm_90a", SHAPE, entry())
    with store.disabled():
        assert store.lookup(BASE, "sm_90a", SHAPE) is None
    assert store.lookup(BASE, "sm_90a", SHAPE) == WINNER
    monkeypatch.setenv(store.ENV_DISABLE, "0")
    store.clear_memo()
    assert store.lookup(BASE, "sm_90a", SHAPE) is None


def test_public_lookup_signature() -> None:
    from swrgen.tune import lookup

    store.save(BASE, "sm_90a", SHAPE, entry())
    assert lookup(BASE, "sm_90a", SHAPE) == WINNER
    assert search.lookup(BASE, "sm_90a", torch.Size(SHAPE)) == WINNER  # x.shape works as is


# ------------------------------------------------------------------ search helpers (no GPU)


def test_normalize_and_check_shapes() -> None:
    assert search.normalize_shape(BASE, (4, 64, 8192)) == (4, 64, 16, 8192)
    assert search.normalize_shape(BASE, (4, 64, 16, 8192)) == (4, 64, 16, 8192)
    for bad in ((4, 64), (4, 64, 32, 8192), (0, 1, 16)):
        with pytest.raises(ValueError):
            search.normalize_shape(BASE, bad)
    for shape in ((1, 128, 16, 131072), (4, 64, 16, 8192), (8, 64, 16, 2048), (1, 1, 16, 100003)):
        b, h, dh, length = search.check_shape(shape)
        assert b * h * dh * length <= max(search.CHECK_ELEMS, dh * length)
        assert length % 64 == shape[3] % 64 and length <= shape[3]


# ------------------------------------------------------------------ kernel families (plain vs fused)

FUSED_YAML = Path(__file__).resolve().parents[1] / "specs" / "hopper_k2_fused.yaml"


def fused_spec():
    from swrgen.spec import load_spec

    return load_spec(FUSED_YAML)


def test_family_chosen_by_fused_gating() -> None:
    assert search.family_for(BASE).name == "swr"
    assert search.family_for(fused_spec()).name == "phalanx"
    fused = default_spec(input_dtype="fp16", gate_dtype="fp16", output_dtype="fp16", fused_gating=True)
    assert search.family_for(fused) is search.FAMILIES["phalanx"]
    plain = default_spec(input_dtype="fp16", gate_dtype="fp16", output_dtype="fp16")
    assert search.family_for(plain) is search.FAMILIES["swr"]
    assert "phalanx_fwd" in search.FAMILIES["phalanx"].kernels and "swr_fwd" in search.FAMILIES["swr"].kernels


def test_fused_shapes_are_b_l_h() -> None:
    spec = fused_spec()
    fam = search.family_for(spec)
    dims = search.normalize_shape(spec, (4, 8192, 64))  # B, L, H
    assert dims == fam.normalize(spec, [4, 8192, 64]) == (4, 64, 16, 8192)
    assert fam.given(dims) == [4, 8192, 64]
    assert fam.label(dims) == "B=4 L=8192 H=64"
    assert buckets.bucket_of(dims) == (256, 8192)  # rows = B * H: one warp per head
    assert buckets.bucket_of(fam.normalize(spec, (1, 32768, 64))) == (64, 32768)
    assert fam.normalize(spec, fam.default_shape) == (4, 64, 16, 8192)  # the plain default's bucket


@pytest.mark.parametrize("bad", [(4, 8192), (4, 64, 16, 8192), (0, 8192, 64), (4, 0, 64), (4, 8192, -1), ()])
def test_fused_shape_errors(bad: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"fused_gating.*B,L,H \(batch, tokens, heads\)"):
        search.normalize_shape(fused_spec(), bad)


@pytest.mark.parametrize(
    "shape",
    [(4, 64, 16, 8192), (1, 64, 16, 32768), (1, 128, 16, 131072), (2, 6, 16, 5000), (8, 24, 16, 100003),
     (1, 1, 16, 70000), (1, 8, 16, 70000), (16, 13, 16, 20000), (2, 7, 16, 1)],
)  # fmt: skip
def test_fused_check_shape(shape: tuple[int, int, int, int]) -> None:
    b, h, dh, length = search.fused_check_shape(shape)
    assert dh == 16 and 1 <= b <= shape[0] and 1 <= h <= shape[1]
    assert length % 64 == shape[3] % 64 and length <= shape[3]
    assert b * h * dh * length <= max(search.CHECK_ELEMS, 8 * dh * length)
    # The vec kernels run iff H is a multiple of 8 (16-byte column blocks): the check runs the same ones.
    assert search.fused_vec_heads(h) == search.fused_vec_heads(shape[1]) == (shape[1] % 8 == 0)


def test_fused_tolerances_by_dtype() -> None:
    fam = search.FAMILIES["phalanx"]
    for dt in ("bf16", "fp16", "fp32"):
        spec = default_spec(input_dtype=dt, gate_dtype=dt, output_dtype=dt, fused_gating=True)
        assert fam.tolerances(spec) == (search.FUSED_TOL[dt], search.FUSED_TOL[dt])
    assert search.FUSED_TOL["fp32"] < search.FUSED_TOL["fp16"] < search.FUSED_TOL["bf16"]


def test_fused_spec_has_its_own_store_file() -> None:
    fused = default_spec(input_dtype="bf16", gate_dtype="bf16", output_dtype="bf16", fused_gating=True)
    plain = default_spec(input_dtype="bf16", gate_dtype="bf16", output_dtype="bf16")
    assert store.file_path(fused) != store.file_path(plain)  # fused_gating is part of the recurrence
    store.save(fused, "sm_90a", (1, 64, 16, 32768), dict(entry(), family="phalanx", shape=[1, 32768, 64]))
    assert store.lookup(fused, "sm_90a", (1, 64, 16, 32768)) == WINNER
    assert store.lookup(plain, "sm_90a", (1, 64, 16, 32768)) is None


class FakeCuda:
    """Enough of torch.cuda (and of the search's GPU helpers) to run tune()'s loop on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, family: type, fwd_ms: dict, bad: dict,
                 bwd_ms: dict | None = None) -> None:  # fmt: skip
        import contextlib

        self.checked: list[tuple[dict, tuple]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "device", lambda *a: contextlib.nullcontext())
        monkeypatch.setattr(search, "device_arch", lambda spec, dev: "sm_90a")
        monkeypatch.setattr(search, "make_timer", lambda warmup, rep: ((lambda fn: fn()), "fake timer"))
        monkeypatch.setattr(search, "_context_ok", lambda: True)
        monkeypatch.setattr(search, "build_program", lambda spec, cand: dict(cand))  # the "program": its knobs

        def key(p: dict) -> tuple[int, int]:
            return p["tiles_per_warp"], p["tiles_in_flight"]

        def check(fam, program, spec, dims, seed, device):
            self.checked.append((program, dims))
            if bad.get(key(program)) == "raise":
                raise RuntimeError("launch failed\nsecond line")
            return bad.get(key(program), (1e-4, 1e-4))

        def timed(fam, spec, dims, device):
            return (lambda p: fwd_ms[key(p)]), (lambda p: (bwd_ms or {}).get(key(p), 0.2))

        monkeypatch.setattr(family, "check", check)
        monkeypatch.setattr(family, "timed", timed)


FAKE_GRID = "warps_per_cta=4;tiles_per_warp=32,64;tiles_in_flight=1,2;cluster_size=1;persistent=false"


@pytest.mark.parametrize(("base_ms", "want"), [(0.161, (64, 1)), (0.123, None)], ids=["gain", "within-noise"])
def test_tune_loop_fused_family(monkeypatch: pytest.MonkeyPatch, base_ms: float, want) -> None:
    """tune() on a fused spec (fakes for the GPU): phalanx family, B,L,H shapes, failures skipped, saved."""
    spec = fused_spec()  # its own target: W=4 T=64 F=8 C=1 P=0
    fwd = {(64, 8): base_ms, (64, 1): 0.122, (32, 2): 0.150, (32, 1): 0.100, (64, 2): 0.090}
    bad = {(32, 1): (0.5, 1e-4), (64, 2): "raise"}  # fastest two: a wrong result and a failed launch
    fake = FakeCuda(monkeypatch, search.PhalanxFamily, fwd, bad)
    lines: list[str] = []
    result = search.tune(spec, [(1, 32768, 64), (1, 40000, 100)], grid=space.parse_grid(FAKE_GRID),
                         progress=lines.append)  # fmt: skip
    assert result["family"] == "phalanx" and "phalanx_fwd" in result["kernels"]
    assert "phalanx family" in lines[0] and "phalanx_fwd" in lines[0]
    assert list(result["buckets"]) == ["rows64/L32768"]  # (1, 40000, 100): rows 100 -> 64, L 40000 -> 32768
    b = result["buckets"]["rows64/L32768"]
    assert b["shape"] == [1, 32768, 64] and b["shapes"] == [[1, 32768, 64], [1, 40000, 100]]
    assert any("timing shape B=1 L=32768 H=64" in line for line in lines)
    # Every candidate was checked at the (reduced) check shape, as (B, H, 16, L).
    assert len(fake.checked) == len(b["results"]) == result["candidates"] == 5
    assert {dims for _, dims in fake.checked} == {search.fused_check_shape((1, 64, 16, 32768))}
    failed = {(r["target"]["tiles_per_warp"], r["target"]["tiles_in_flight"]): r for r in b["results"] if not r["ok"]}
    assert set(failed) == {(32, 1), (64, 2)}
    assert "wrong result" in failed[(32, 1)]["reason"] and "RuntimeError: launch failed" == failed[(64, 2)]["reason"]
    winner = b["winner"]
    chosen = (winner["target"]["tiles_per_warp"], winner["target"]["tiles_in_flight"])
    assert chosen == (want or (64, 8))  # within MIN_GAIN of the spec's own target: keep it
    assert winner["family"] == "phalanx" and winner["shape"] == [1, 32768, 64] and winner["failed"] == 2
    assert Path(b["file"]).is_file()
    assert store.lookup(spec, "sm_90a", (1, 64, 16, 32768)) == winner["target"]
    assert store.lookup(spec, "sm_90a", (1, 100, 16, 40000)) == winner["target"]  # same bucket
    assert json.loads(Path(b["file"]).read_text())["recurrence"]["fused_gating"] is True


def test_tune_stores_per_direction_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward launch separately: where each kernel alone has a clearly faster config than
    the joint winner, the entry keeps it for that direction, and lookup(direction=...) answers it."""
    spec = fused_spec()  # its own target: W=4 T=64 F=8
    fwd = {(64, 8): 0.161, (64, 1): 0.120, (32, 2): 0.165, (32, 1): 0.125, (64, 2): 0.160}
    bwd = {(64, 8): 0.316, (64, 1): 0.416, (32, 2): 0.330, (32, 1): 0.420, (64, 2): 0.317}
    FakeCuda(monkeypatch, search.PhalanxFamily, fwd, {}, bwd)
    lines: list[str] = []
    result = search.tune(spec, [(1, 32768, 64)], grid=space.parse_grid(FAKE_GRID), progress=lines.append)
    winner = result["buckets"]["rows64/L32768"]["winner"]
    joint = winner["target"]
    assert (joint["tiles_per_warp"], joint["tiles_in_flight"]) == (64, 8)  # 0.477 ms: F=1's 0.536 loses jointly
    assert (winner["fwd_target"]["tiles_per_warp"], winner["fwd_target"]["tiles_in_flight"]) == (64, 1)
    assert winner["fwd_alone_ms"] == 0.120
    assert "bwd_target" not in winner  # (64, 2) is within MIN_GAIN of the joint winner's backward
    assert any("the fwd kernel alone is fastest" in line for line in lines)
    dims = (1, 64, 16, 32768)
    assert store.lookup(spec, "sm_90a", dims, "fwd") == winner["fwd_target"]
    assert store.lookup(spec, "sm_90a", dims, "bwd") == joint
    assert store.lookup(spec, "sm_90a", dims) == joint
    with pytest.raises(ValueError, match="direction"):
        store.lookup(spec, "sm_90a", dims, "sideways")


def test_direction_target_the_spec_rejects_falls_back_to_joint() -> None:
    store.save(BASE, "sm_90a", SHAPE, dict(entry(), fwd_target=dict(WINNER, cluster_size=2)))
    assert store.lookup(BASE.replace_target(archs=("sm_80",)), "sm_80", SHAPE) is None  # other arch: no entry
    spec80 = BASE.replace_target(archs=("sm_90a", "sm_80"))  # a cluster is invalid for this spec
    assert store.lookup(spec80, "sm_90a", SHAPE, "fwd") == WINNER


def test_tune_loop_plain_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loop on a plain spec: swr family, B,H,L shapes recorded as B,H,DH,L (as before)."""
    base = BASE.replace_target(tiles_per_warp=64, tiles_in_flight=4, warps_per_cta=4, cluster_size=1,
                               persistent=False)  # fmt: skip
    fwd = {(64, 4): 0.2, (64, 1): 0.15, (32, 2): 0.18, (32, 1): 0.19, (64, 2): 0.3}
    FakeCuda(monkeypatch, search.SwrFamily, fwd, {})
    lines: list[str] = []
    result = search.tune(base, [(4, 64, 8192)], grid=space.parse_grid(FAKE_GRID), progress=lines.append)
    assert result["family"] == "swr" and "swr family" in lines[0]
    b = result["buckets"]["rows256/L8192"]
    assert b["shape"] == [4, 64, 16, 8192] and b["winner"]["shape"] == [4, 64, 16, 8192]
    assert b["winner"]["family"] == "swr" and b["winner"]["target"]["tiles_in_flight"] == 1
    assert store.lookup(base, "sm_90a", SHAPE) == b["winner"]["target"]


def test_tune_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        search.tune(BASE, [(1, 1, 64)], progress=None)
    with pytest.raises(ValueError, match="objective"):
        search.tune(BASE, [(1, 1, 64)], objective="speed")
    with pytest.raises(ValueError, match="B,L,H"):  # a bad shape is reported before the missing GPU
        search.tune(fused_spec(), [(1, 64, 16, 64)], progress=None)


# ------------------------------------------------------------------ CLI


def run_cli(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def spec_file() -> str:
    return str(Path(__file__).resolve().parents[1] / "specs" / "hopper_k2.yaml")


def test_cli_tune_without_cuda_errors_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    result = run_cli("tune", spec_file(), "--shape", "4,64,8192")
    assert result.exit_code == 1
    assert "needs a CUDA device" in result.output and "--compile-only" in result.output


@pytest.mark.parametrize(("args", "hint"), [(("--grid", "nope=1"), "--grid"), (("--shape", "4,64"), "--shape")])
def test_cli_tune_bad_arguments(args: tuple[str, ...], hint: str) -> None:
    result = run_cli("tune", spec_file(), *args)
    assert result.exit_code == 2 and hint in result.output


@pytest.mark.parametrize("shape", ["4,64,16,8192", "4,8192", "4,0,64", "4,x,64", "4,8192,64,"])
def test_cli_tune_fused_bad_shapes(shape: str) -> None:
    result = run_cli("tune", str(FUSED_YAML), "--shape", shape)
    assert result.exit_code == 2, result.output
    assert "--shape" in result.output and "B,L,H" in result.output


def test_cli_tune_fused_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    result = run_cli("tune", str(FUSED_YAML), "--shape", "1,32768,64")  # a valid B,L,H: only the GPU is missing
    assert result.exit_code == 1 and "needs a CUDA device" in result.output


def test_cli_tune_help_documents_fused_shapes() -> None:
    result = run_cli("tune", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "B,H,L" in text and "fused_gating: true" in text and "B,L,H = batch, tokens, heads" in text
    assert "[default: 4,8192,64]" in text and "hopper_k2_fused.yaml --shape 1,32768,64" in text


def test_cli_tune_compile_only(session_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(session_cache_dir))  # compiled cubins shared with other tests
    result = run_cli("tune", spec_file(), "--compile-only", "--grid",
                     "warps_per_cta=4;tiles_in_flight=2;cluster_size=1,2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "distinct sources for sm_90a" in result.output


def test_cli_bench_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    result = run_cli("bench", "--k", "2")
    assert result.exit_code == 2
    assert "needs a CUDA device" in result.output


# ------------------------------------------------------------------ bench helpers


def synthetic_results() -> dict:
    gen, alts = [], []
    for length, (b, h) in zip((2048, 8192, 32768), ((8, 64), (4, 64), (1, 64)), strict=True):
        for k in (2, 3):
            for out in ("fp32", "bf16"):
                gen.append(dict(k=k, out=out, B=b, H=h, DH=16, L=length, fwd_ms=0.05 * length / 2048,
                                bwd_ms=0.07 * length / 2048, fwd_pct=70.0, bwd_pct=60.0, fwd_GBps=2100.0,
                                bwd_GBps=1800.0))  # fmt: skip
        alts.append(dict(method="sdpa_causal", B=b, H=h, L=length, fwd_ms=0.2 * length / 2048, bwd_ms=0.5,
                         note="causal", wall_s=1.0))  # fmt: skip
        alts.append(dict(method="hgrn", B=b, H=h, L=length, unavailable="fla.ops.hgrn not importable"))
        alts.append(dict(method="flex_swa512", B=b, H=h, L=length, fwd_ms=0.3, bwd_note="not timed", wall_s=2.0))
    return dict(schema=1, command="swrgen bench", date="2026-11-25T12:00:00+00:00", device="Fake GPU",
                copy_Bps=3.0e12, versions={"torch": "2.11", "driver": "580"}, timer="do_bench", generated=gen,
                alternatives=alts, unavailable={"hgrn": "fla.ops.hgrn not importable"},
                launch_overhead={"op(a, x)": 12.5, "CUDA graph: replay of 1 call": 3.0}, elapsed_s=100.0)  # fmt: skip


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.tools import plot

    src = tmp_path / "results.json"
    src.write_text(json.dumps(synthetic_results()))
    out = tmp_path / "out.png"
    assert plot.main([str(src), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_table_and_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import run

    res = synthetic_results()
    text = run.table(res)
    assert "sdpa_causal" in text and "fla.ops.hgrn not importable" in text
    assert "0.250" in text  # gen/alt fwd ratio at 2048: 0.05 / 0.2
    src = tmp_path / "r.json"
    src.write_text(json.dumps(res))
    md = tmp_path / "log.md"
    md.write_text("# Benchmark log\n")
    monkeypatch.setattr(run, "RESULTS_MD", md)
    assert run.main(["--record-from", str(src)]) == 0
    body = md.read_text()
    assert "## Suite run — 2026-11-25, Fake GPU" in body and "```" in body


def test_ab_labels_keep_same_named_folders_apart() -> None:
    from bench.tools.ab import program_labels

    assert program_labels(["specs/hopper_k2.yaml", ".baseline/old/hopper_k2"]) == ["specs/hopper_k2", "old/hopper_k2"]
    assert program_labels(["specs/a.yaml", "b/c"]) == ["a", "c"]
    assert program_labels(["a/v0/hopper_k2", "a/v2/hopper_k2"]) == ["v0/hopper_k2", "v2/hopper_k2"]
    with pytest.raises(SystemExit, match="share a label"):
        program_labels(["x/v0/hopper_k2", "y/v0/hopper_k2"])


# ------------------------------------------------------------------ the fp32 torch SWR (an alternative)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [1, 16, 37, 300])
@pytest.mark.parametrize("per_channel", [False, True])
def test_swr_torch_fp32_matches_reference(k: int, length: int, per_channel: bool) -> None:
    from bench.alternatives import swr_torch_fp32

    g = torch.Generator().manual_seed(k * 1000 + length)
    x = torch.randn(2, 3, 16, length, generator=g)
    a = 2 * torch.rand((2, 3, 16, length) if per_channel else (2, 3, length), generator=g) - 1  # signed gates
    y = swr_torch_fp32(a, x, k, 16)
    ref = swr_reference(a, x, k, 16)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_swr_torch_fp32_gradients_and_zero_gates() -> None:
    from bench.alternatives import swr_torch_fp32

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 80, generator=g)
    a = 0.5 + 0.5 * torch.rand(1, 2, 80, generator=g)
    a[..., ::7] = 0.0  # exact zeros: no logs or divisions in the transfer matrices
    dy = torch.randn(1, 2, 16, 80, generator=g)
    a32, x32 = a.clone().requires_grad_(), x.clone().requires_grad_()
    torch.autograd.backward(swr_torch_fp32(a32, x32, 2, 16), dy)
    a64, x64 = a.double().requires_grad_(), x.double().requires_grad_()
    torch.autograd.backward(swr_reference(a64, x64, 2, 16), dy.double())
    for got, want in ((x32.grad, x64.grad), (a32.grad, a64.grad)):
        assert torch.isfinite(got).all()
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_alternatives_import_without_optional_packages() -> None:
    from bench import alternatives

    assert set(alternatives.MAKERS) == {"sdpa_causal", "torch_fp32", "accelerated_scan", "hgrn", "flex_swa512",
                                        "torch_fp32_compile"}  # fmt: skip


def test_spec_error_type_is_what_space_filters() -> None:
    # space.is_valid relies on replace_target raising SpecError for invalid knob values.
    with pytest.raises(SpecError):
        BASE.replace_target(warps_per_cta=3)
    assert not space.is_valid(BASE, "sm_90a", {"warps_per_cta": 3})
    assert os.environ["SWRGEN_CACHE_DIR"]
