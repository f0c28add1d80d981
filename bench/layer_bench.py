"""Layer-level forward+backward: Phalanx vs sliding-window attention vs causal attention (GPU).

Same model width D for every layer, bf16 parameters and activations:
  phalanx          swrgen.nn.Phalanx(D, head_dim=16, window_blocks=2)   (fused gating + SWR kernels)
  phalanx_unfused  the same with fused=False (torch gating, transposes, swrgen.swr)
  flex_swa  Linear(D, 3D) -> FlexAttention, window 512, head dim 64 -> Linear(D, D)
  sdpa      Linear(D, 3D) -> SDPA causal, head dim 64 -> Linear(D, D)

    python3 bench/layer_bench.py --dim 1024 --lengths 2048 8192 32768 --batch 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_swr import bench_ms
from swrgen.nn import Phalanx

ATTN_HEAD_DIM = 64
WINDOW = 512


class Attention(nn.Module):
    def __init__(self, dim: int, window: int | None, length: int) -> None:
        super().__init__()
        self.heads = dim // ATTN_HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.window = window
        if window is not None:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def swa(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

            self.mask = create_block_mask(swa, None, None, length, length, device="cuda")
            self.flex = torch.compile(flex_attention, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, ATTN_HEAD_DIM).permute(2, 0, 3, 1, 4)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = self.flex(q, k, v, block_mask=self.mask)
        return self.out(o.transpose(1, 2).reshape(b, length, dim))


def time_layer(layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(median GPU ms per fwd+bwd, host ms to issue one): when the two are close the layer is
    launch-bound at this size and the GPU time measures Python, not kernels."""
    dy = torch.randn_like(x)

    def step() -> None:
        layer(x).backward(dy)

    gpu = bench_ms(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    return gpu, host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  D={args.dim} B={args.batch} (fwd+bwd ms)")
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layers = {
            "phalanx": lambda length=length: Phalanx(args.dim, head_dim=16, window_blocks=2),
            "phalanx_unfused": lambda length=length: Phalanx(args.dim, head_dim=16, window_blocks=2, fused=False),
            "flex_swa512": lambda length=length: Attention(args.dim, WINDOW, length),
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
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
