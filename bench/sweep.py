"""Time a grid of tuning configs for one spec and shape (GPU): the autotuner's raw data.

python bench/sweep.py --k 2 --shape 4,64,8192
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from bench.bench_swr import bench_ms, copy_bandwidth
from swrgen.ops.swr import launch
from swrgen.spec import default_spec

GRID = dict(tiles_in_flight=(2, 4), warps_per_cta=(4, 8), tiles_per_warp=(32, 64, 128, 256), persistent=(False,))


def parse_grid(text: str) -> dict[str, tuple]:
    """ "tiles_in_flight=2,4;tiles_per_warp=64,128" -> {"tiles_in_flight": (2, 4), ...} over GRID's defaults."""
    grid = dict(GRID)
    for part in filter(None, text.split(";")):
        key, vals = part.split("=")
        grid[key] = tuple(v.lower() == "true" if v.lower() in ("true", "false") else int(v) for v in vals.split(","))
    return grid


def sweep_specs(k: int, grid: dict[str, tuple] | None = None):
    grid = grid or GRID
    base = default_spec(window_blocks=k)
    keys = list(grid)
    return [base.replace_target(**dict(zip(keys, vals, strict=True))) for vals in itertools.product(*grid.values())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--shape", default="4,64,8192")
    ap.add_argument("--grid", default="", help='e.g. "tiles_in_flight=2,4;tiles_per_warp=64,128"')
    ap.add_argument("--l2", type=int, default=None, help="override constants.L2_PREFETCH_BYTES (0, 64, 128, 256)")
    args = ap.parse_args()
    if args.l2 is not None:
        from swrgen import constants

        constants.L2_PREFETCH_BYTES = args.l2
    b, h, length = (int(v) for v in args.shape.split(","))
    bw = copy_bandwidth()
    x = torch.randn(b, h, 16, length, device="cuda").bfloat16()
    a = (0.5 + 0.5 * torch.rand(b, h, length, device="cuda")).bfloat16()
    fb = x.numel() * 2 + a.numel() * 2 + x.numel() * 4
    bb = 2 * x.numel() * 2 + 2 * a.numel() * 2 + x.numel() * 4
    ref_y = ref_g = None
    print(f"{torch.cuda.get_device_name()} copy {bw / 1e12:.3f} TB/s; k={args.k} B,H,L={b},{h},{length} l2={args.l2}")
    for spec in sweep_specs(args.k, parse_grid(args.grid)):
        prog = swrgen.load(spec).program
        y = launch.forward(prog, a, x)
        dy = torch.ones_like(y) * 0.5
        g = launch.backward(prog, a, x, dy)
        if ref_y is None:
            ref_y, ref_g = y, g
        same = torch.equal(y, ref_y) and all(torch.equal(u, v) for u, v in zip(g, ref_g, strict=True))
        f = bench_ms(lambda: launch.forward(prog, a, x))  # noqa: B023
        bk = bench_ms(lambda: launch.backward(prog, a, x, dy))  # noqa: B023
        t = spec.target
        print(f"F={t.tiles_in_flight} W={t.warps_per_cta} T={t.tiles_per_warp:3d} P={int(t.persistent)}: "
              f"fwd {f:.4f} ms {100 * fb / bw / f / 1e-3:4.0f}%  bwd {bk:.4f} ms {100 * bb / bw / bk / 1e-3:4.0f}%"
              f"  identical={same}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
