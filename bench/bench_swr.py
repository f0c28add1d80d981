"""Time the generated SWR forward/backward against the copy-bandwidth floor (GPU).

    python bench/bench_swr.py [--shapes 4,64,8192 ...] [--json out.json]

Bytes counted (each read or written once): forward x + a + y; backward x + a + dy + dx + da.
Floor = bytes / copy bandwidth measured in the same run (device-to-device copy, read+write).
Times are medians of CUDA-event timings (triton.testing.do_bench when available).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from swrgen.ops.swr import launch
from swrgen.spec import default_spec

DEFAULT_SHAPES = [(8, 64, 2048), (4, 64, 8192), (1, 64, 32768), (1, 128, 131072)]


def bench_ms(fn) -> float:
    """Median ms of fn: triton's do_bench where importable, else CUDA events (the autotuner's timer)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        from swrgen.tune.search import event_median_ms

        return event_median_ms(fn)
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=[])
    ap.add_argument("--k", type=int, nargs="*", default=[2])
    ap.add_argument("--out", nargs="*", default=["fp32"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tune", default="", help="target overrides, e.g. tiles_per_warp=64,warps_per_cta=8")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or DEFAULT_SHAPES
    overrides = {}
    for kv in filter(None, args.tune.split(",")):
        key, val = kv.split("=")
        overrides[key] = val.lower() == "true" if val.lower() in ("true", "false") else int(val)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s  torch {torch.__version__}")
    rows = []
    for k in args.k:
        for out in args.out:
            spec = default_spec(window_blocks=k, output_dtype=out)
            if overrides:
                spec = spec.replace_target(**overrides)
            program = swrgen.load(spec).program
            for b, h, length in shapes:
                g = torch.Generator(device="cuda").manual_seed(0)
                x = torch.randn(b, h, 16, length, device="cuda", generator=g).bfloat16()
                a = (0.5 + 0.5 * torch.rand(b, h, length, device="cuda", generator=g)).bfloat16()
                y = launch.forward(program, a, x)
                dy = torch.randn_like(y)
                fwd = bench_ms(lambda: launch.forward(program, a, x))  # noqa: B023
                bwd = bench_ms(lambda: launch.backward(program, a, x, dy))  # noqa: B023
                fb = x.numel() * 2 + a.numel() * 2 + y.numel() * y.element_size()
                bb = 2 * x.numel() * 2 + 2 * a.numel() * 2 + dy.numel() * dy.element_size()
                row = dict(k=k, out=out, B=b, H=h, L=length, fwd_ms=fwd, bwd_ms=bwd,
                           fwd_floor_ms=fb / bw * 1e3, bwd_floor_ms=bb / bw * 1e3,
                           fwd_pct=100 * fb / bw / (fwd * 1e-3), bwd_pct=100 * bb / bw / (bwd * 1e-3),
                           fwd_GBps=fb / (fwd * 1e-3) / 1e9, bwd_GBps=bb / (bwd * 1e-3) / 1e9)  # fmt: skip
                rows.append(row)
                print(f"k={k} out={out} B={b} H={h} L={length}: fwd {fwd:.4f} ms ({row['fwd_pct']:.0f}% of floor "
                      f"{row['fwd_floor_ms']:.4f}) bwd {bwd:.4f} ms ({row['bwd_pct']:.0f}% of floor "
                      f"{row['bwd_floor_ms']:.4f})", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_Bps": bw,
                                               "torch": torch.__version__, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
