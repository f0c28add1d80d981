"""Time the fused Phalanx kernels (gating + SWR on the [B, L, N] projections) against the copy-bandwidth
floor and against the unfused torch path they replace (GPU).

    python3 bench/bench_fused.py [--shapes 2,8192,1024 ...] [--json out.json]

Shapes are (B, L, D) with heads = D / 16 and kv_heads = heads, bf16. Bytes (each read or written once):
forward P + Z; backward P + dZ + dP. The unfused path is Phalanx(fused=False)'s gating: sigmoid, B*V,
the transposes to [B, H, DH, L], swrgen.swr (fp32 out), the transpose back, Y*C + V.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from bench.bench_swr import bench_ms, copy_bandwidth
from bench.specs import fused_sweep_specs
from swrgen.ops.phalanx import GatingLayout, launch
from swrgen.ops.phalanx.reference import split_projections

DEFAULT_SHAPES = [(8, 2048, 1024), (2, 8192, 1024), (1, 32768, 1024), (1, 131072, 2048)]


def unfused(P: torch.Tensor, layout: GatingLayout, dm: float) -> torch.Tensor:
    pa, pb, pc, pv = split_projections(P, layout)
    a = (dm * torch.sigmoid(pa)).transpose(1, 2).contiguous()
    x = (torch.sigmoid(pb) * pv).permute(0, 2, 3, 1).contiguous()
    y = swrgen.swr(a, x, window_blocks=2).permute(0, 3, 1, 2).to(P.dtype)
    return (y * pc + pv).flatten(2)


def time_shape(batch: int, length: int, dim: int, specs, bw: float) -> list[dict]:
    layout = GatingLayout(dim // 16, dim // 16, 16)
    P = torch.randn(batch, length, layout.width, device="cuda", dtype=torch.bfloat16)
    dZ = torch.randn(batch, length, layout.inner, device="cuda", dtype=torch.bfloat16)
    esz = P.element_size()
    fwd_bytes = (P.numel() + dZ.numel()) * esz
    bwd_bytes = (2 * P.numel() + dZ.numel()) * esz
    with torch.no_grad():
        t_unfused = bench_ms(lambda: unfused(P, layout, 0.8))
    rows = []
    for spec in specs:
        program = swrgen.load(spec).program
        t_f = bench_ms(lambda program=program: launch.forward(program, P, layout, 0.8))
        t_b = bench_ms(lambda program=program: launch.backward(program, P, dZ, layout, 0.8))
        row = {"B": batch, "L": length, "D": dim, "spec": spec.target.to_dict(), "fwd_ms": t_f, "bwd_ms": t_b,
               "fwd_floor_pct": 100 * fwd_bytes / bw / (t_f * 1e-3),
               "bwd_floor_pct": 100 * bwd_bytes / bw / (t_b * 1e-3), "unfused_fwd_ms": t_unfused}  # fmt: skip
        rows.append(row)
        t = spec.target
        print(f"B={batch} L={length:6d} D={dim}  w={t.warps_per_cta} T={t.tiles_per_warp} P={t.persistent}: "
              f"fwd {t_f:.3f} ms ({row['fwd_floor_pct']:.0f}% of floor)  bwd {t_b:.3f} ms "
              f"({row['bwd_floor_pct']:.0f}%)  unfused fwd {t_unfused:.3f} ms", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=[])
    ap.add_argument("--sweep", action="store_true", help="also time the fused tuning sweep (bench/specs.py)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or DEFAULT_SHAPES
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s  torch {torch.__version__}")
    specs = fused_sweep_specs() if args.sweep else fused_sweep_specs()[:1]
    rows = [row for shape in shapes for row in time_shape(*shape, specs, bw)]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_Bps": bw,
                                               "torch": torch.__version__, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
