"""GPU tests of the autotuner: a real (tiny) search of the fused Phalanx kernels, and of the plain ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swrgen.spec import SPECS_DIR, load_spec
from swrgen.tune import search, space, store
from tests.gpu_util import fused_spec_for

pytestmark = pytest.mark.gpu

# Every knob pinned but two: the spec's own target plus 4 candidates (3 distinct sources: tiles_per_warp
# is a launch parameter).
GRID = "warps_per_cta=4;tiles_per_warp=32,64;tiles_in_flight=1,2;cluster_size=1;persistent=false"


def tune_tiny(spec, shape):
    lines: list[str] = []
    result = search.tune(spec, [shape], grid=space.parse_grid(GRID), rep_ms=5.0, warmup_ms=2.0,
                         progress=lines.append)  # fmt: skip
    assert len(result["buckets"]) == 1
    return result, next(iter(result["buckets"].values())), lines


def assert_all_passed(spec, result, bucket, tol_f, tol_b):
    rows = bucket["results"]
    grid = search.family_for(spec).grid(spec, space.parse_grid(GRID))  # the fused family pins staging
    assert len(rows) == result["candidates"] == len(space.candidates(spec, result["arch"], grid))
    for row in rows:
        assert row["ok"], f"{space.describe(row['target'])}: {row.get('reason')}"
        assert row["err_fwd"] <= tol_f and row["err_bwd"] <= tol_b
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0


FUSED = load_spec(SPECS_DIR / "hopper_k2_fused.yaml")


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (FUSED, (2, 4100, 8)),  # bf16, 8 heads: the vec kernels; a partial last tile
        (FUSED, (3, 1000, 6)),  # bf16, 6 heads: unaligned column blocks, the scalar kernels
        (FUSED, (1, 40000, 64)),  # check shape reduced to L 16384, 16 heads
        (fused_spec_for(k=3, dtype="fp16"), (2, 3000, 8)),
        (fused_spec_for(k=2, bl=32, dtype="fp32"), (2, 3000, 8)),
    ],
    ids=["bf16-vec", "bf16-scalar", "bf16-long", "fp16", "fp32"],
)
def test_tune_fused_spec(tuned_cache: Path, spec, shape: tuple[int, int, int]) -> None:
    batch, length, heads = shape  # B, L, H: the fused family's shapes
    result, bucket, lines = tune_tiny(spec, shape)
    assert result["family"] == "phalanx" and "phalanx family" in lines[0]
    tol = search.FUSED_TOL[spec.recurrence.input_dtype]
    assert_all_passed(spec, result, bucket, tol, tol)
    winner = bucket["winner"]
    assert winner is not None and winner["family"] == "phalanx" and winner["shape"] == [batch, length, heads]
    assert bucket["file"] and Path(bucket["file"]).is_file()
    assert Path(bucket["file"]).parent == tuned_cache / "tuned"
    arch = search.device_arch(spec, torch.device("cuda"))
    assert store.lookup(spec, arch, (batch, heads, 16, length)) == winner["target"]


def test_tune_plain_spec(tuned_cache: Path) -> None:
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    result, bucket, lines = tune_tiny(spec, (2, 8, 4100))
    assert result["family"] == "swr" and "swr family" in lines[0]
    assert_all_passed(spec, result, bucket, search.FWD_TOL[spec.recurrence.output_dtype], search.BWD_TOL)
    winner = bucket["winner"]
    assert winner is not None and winner["shape"] == [2, 8, 16, 4100]
    arch = search.device_arch(spec, torch.device("cuda"))
    assert store.lookup(spec, arch, (2, 8, 16, 4100)) == winner["target"]
