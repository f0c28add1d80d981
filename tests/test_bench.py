"""The benchmark tree on the CPU: every entry point imports and answers --help without a GPU, the shared
helpers count what docs/performance.md says, and the docs' links and section names hold."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common

ROOT = Path(__file__).resolve().parents[1]
# Entry points: module -> what its "needs a CUDA device" message names (None: runs without a GPU).
ENTRY_POINTS = {
    "bench.run": "swrgen bench",
    "bench.ops.swr": "bench/ops/swr.py",
    "bench.ops.phalanx_gating": "bench/ops/phalanx_gating.py",
    "bench.ops.host": "bench/ops/host.py",
    "bench.layers.phalanx": "bench/layers/phalanx.py",
    "bench.models.hybrid": "bench/models/hybrid.py",
    "bench.tools.ab": "bench/tools/ab.py",
    "bench.tools.profile_one": "bench/tools/profile_one.py",
    "bench.tools.edge_check": "bench/tools/edge_check.py",
    "bench.tools.plot": None,
    "bench.tools.variant": None,
    "bench.tools.warm_cache": None,
}
DOC_FILES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "bench" / "README.md",
             ROOT / "bench" / "results" / "README.md", ROOT / "bench" / "results" / "log.md"]  # fmt: skip


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_point_help(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(m for m, name in ENTRY_POINTS.items() if name and m != "bench.run"))
def test_entry_point_without_cuda_says_so(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["specs/hopper_k2.yaml"] if module == "bench.tools.ab" else []
    with pytest.raises(SystemExit, match=f"{re.escape(ENTRY_POINTS[module])} needs a CUDA device"):
        importlib.import_module(module).main(args)


@pytest.mark.parametrize("path", ["bench/run.py", "bench/ops/swr.py"])
def test_scripts_run_as_files(path: str) -> None:
    """``python bench/...py`` from the repository root finds the ``bench`` package by itself."""
    done = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_floor_bytes_match_the_log() -> None:
    # (4, 64, 8192), bf16 in, fp32 out: the floors bench/results/log.md gives at 3.000 TB/s.
    x = torch.empty(4, 64, 16, 8192, dtype=torch.bfloat16, device="meta")
    a = torch.empty(4, 64, 8192, dtype=torch.bfloat16, device="meta")
    fwd, bwd = common.swr_bytes(x, a, 4)
    assert (fwd, bwd) == (x.numel() * 6 + a.numel() * 2, x.numel() * 8 + a.numel() * 4)
    assert round(fwd / 3.0e12 * 1e3, 4) == 0.0685 and round(bwd / 3.0e12 * 1e3, 4) == 0.0923
    P = torch.empty(2, 8192, 64 + 2 * 64 * 16 + 64 * 16, dtype=torch.bfloat16, device="meta")
    z = 2 * 8192 * 64 * 16
    assert common.gating_bytes(P, z) == ((P.numel() + z) * 2, (2 * P.numel() + z) * 2)
    assert common.pct_of_floor(fwd, 3.0e12, fwd / 3.0e12 * 1e3) == pytest.approx(100.0)


def test_shape_and_knob_arguments() -> None:
    import argparse

    assert common.shape_type("B,H,L")("4,64,8192") == (4, 64, 8192)
    for bad, why in (("4,64", "expected B,H,L"), ("4,0,8", ">= 1"), ("a,b,c", "expected B,H,L")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            common.shape_type("B,H,L")(bad)
    assert common.parse_knobs("tiles_per_warp=15, staging=shared,persistent=TRUE") == {
        "tiles_per_warp": 15, "staging": "shared", "persistent": True}  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        common.parse_knobs("tiles_per_warp")


def test_ab_spread_is_half_the_rounds_range_over_their_median() -> None:
    from bench.tools.ab import spread

    assert spread([0.150, 0.150, 0.150]) == 0.0
    assert spread([0.148, 0.150, 0.156, 0.151, 0.149]) == pytest.approx(50 * 0.008 / 0.150)


def test_sweep_specs_skip_impossible_configs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.ops.swr import GRID, sweep_specs

    assert len(sweep_specs(2)) == len(GRID["tiles_in_flight"]) * len(GRID["warps_per_cta"]) * len(
        GRID["tiles_per_warp"])  # fmt: skip
    # 16 tiles in flight need shared staging (the register budget): that combination is skipped, said why.
    specs = sweep_specs(2, {"tiles_in_flight": (8, 16)})
    assert [s.target.tiles_in_flight for s in specs] == [8]
    assert "skipped {'tiles_in_flight': 16}" in capsys.readouterr().out


def test_warm_cache_covers_the_benchmarks() -> None:
    from bench.ops.phalanx_gating import fused_sweep_specs
    from bench.ops.swr import sweep_specs
    from bench.tools.warm_cache import bench_specs

    specs = bench_specs()
    assert len(specs) == 6 + len(sweep_specs(2)) + len(sweep_specs(3)) + len(fused_sweep_specs())
    assert sum(s.recurrence.fused_gating for s in specs) == len(fused_sweep_specs())


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", path.read_text())


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    for link in _links(path):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.relative_to(ROOT)}: link {link!r} points at nothing"
        if anchor and file.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
            assert anchor in slugs, f"{path.relative_to(ROOT)}: no section #{anchor} in {target or path.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages == {"semantics.md", "algorithms.md", "performance.md", "code-map.md", "serving.md",
                     "context-parallel.md"}
    for page in pages:
        assert f"]({page})" in index, f"docs/README.md does not list {page}"


def test_code_points_at_sections_that_exist() -> None:
    """The code's comments cite docs/semantics.md and its section "The Phalanx layer"."""
    text = (ROOT / "docs" / "semantics.md").read_text()
    assert re.search(r"^## The Phalanx layer$", text, flags=re.M)
    sources = [p for d in ("swrgen", "templates") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".j2")]
    cited = [p for p in sources if "docs/semantics.md" in p.read_text()]
    assert cited, "nothing in swrgen/ or templates/ cites docs/semantics.md (the test would check nothing)"


# How a GPU was borrowed for a run (carried wheels, result archives, the borrowing tool's output folder) is no
# part of the project. Spelled in pieces so that the grep for these words does not find this file.
BORROWING = re.compile("|".join([r"carry (the )?\.whl", r"res\.tgz", "dev" + "ice tool", r"\$" + "OUT/",
                                 "tar" + "ball"]))  # fmt: skip


def test_bench_and_docs_say_nothing_of_how_a_gpu_was_borrowed() -> None:
    files = [p for d in ("bench", "docs") for p in (ROOT / d).rglob("*") if p.suffix in (".md", ".py", ".sh")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if BORROWING.search(line)]  # fmt: skip
    assert not hits, hits
