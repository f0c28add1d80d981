"""Layer-level forward+backward: Phalanx against sliding-window and causal attention layers (GPU).

    python bench/layers/phalanx.py [--dim 1024] [--batch 2] [--lengths 2048 8192 32768] [--json F]

Same model width D for every layer, bf16 parameters and activations:
  phalanx          swrgen.nn.Phalanx(D, head_dim=16, window_blocks=2)   (fused gating + SWR kernels)
  phalanx_unfused  the same with fused=False (torch gating, transposes, swrgen.swr)
  flex_swa512      Linear(D, 3D) -> FlexAttention, window 512, head dim 64 -> Linear(D, D)
  sdpa_causal      Linear(D, 3D) -> SDPA causal, head dim 64 -> Linear(D, D)

Each cell: the median GPU time of one fwd+bwd and the host time to issue one. Where the two are close the
layer is launch-bound at that size, and the GPU time measures Python, not kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from bench import common
from bench.alternatives import SWA_WINDOW, Attention


def time_layer(layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(median GPU ms per fwd+bwd, host ms to issue one): when the two are close the layer is
    launch-bound at this size and the GPU time measures Python, not kernels."""
    dy = torch.randn_like(x)

    def step() -> None:
        layer(x).backward(dy)

    gpu = common.bench_ms(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    return gpu, host


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/layers/phalanx.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024, help="model width D")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768], help="sequence lengths L")
    ap.add_argument("--json", default=None, help="write every number here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/layers/phalanx.py")
    from swrgen.nn import Phalanx

    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  D={args.dim} B={args.batch} (fwd+bwd ms)")
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layers = {
            "phalanx": lambda length=length: Phalanx(args.dim, head_dim=16, window_blocks=2),
            "phalanx_unfused": lambda length=length: Phalanx(args.dim, head_dim=16, window_blocks=2, fused=False),
            "flex_swa512": lambda length=length: Attention(args.dim, SWA_WINDOW, length),
            "sdpa_causal": lambda length=length: Attention(args.dim, None, length),
        }
        row = {"L": length, "B": args.batch, "D": args.dim}
        for name, make in layers.items():
            try:
                layer = make().to(device="cuda", dtype=torch.bfloat16)
                row[name], row[name + "_host"] = time_layer(layer, x)
            except Exception as err:  # an unavailable alternative is reported, not fatal
                row[name] = row[name + "_host"] = None
                print(f"  {name} at L={length}: unavailable ({type(err).__name__}: {err})")
        tok = args.batch * length
        cells = "  ".join(
            f"{n} {row[n]:.3f} ms (host {row[n + '_host']:.3f}; {tok / row[n] / 1e3:.2f} Mtok/s)" if row[n]
            else f"{n} n/a" for n in layers
        )  # fmt: skip
        print(f"L={length:6d}: {cells}", flush=True)
        rows.append(row)
    common.write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
