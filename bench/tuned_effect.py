"""What the stored tuned configs buy: the ops' own path with them and with ``SWRGEN_TUNED=0`` (GPU).

    python3 bench/tuned_effect.py [--json out.json]

Times the forward and the backward the way the ops launch them (``swrgen.swr`` / ``swrgen.phalanx_gating``
inference for the forward, the registered backward ops for the backward), so each direction gets the
program its tuned entry names (shipped in swrgen/tune/tuned/ or written by ``swrgen tune``). Outputs of
the two settings must be bitwise identical. % = share of the copy-bandwidth floor (bytes as bench_swr.py
and bench_fused.py count them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from bench.bench_swr import bench_ms, copy_bandwidth
from swrgen.ops.phalanx import GatingLayout
from swrgen.ops.swr.op import _default_key
from swrgen.tune import store

SWR_SHAPES = [(8, 64, 2048), (4, 64, 8192), (1, 64, 32768), (1, 128, 131072)]
FUSED_SHAPES = [(2, 8192, 64), (1, 32768, 64), (1, 131072, 128)]  # B, L, heads (D = 16 * heads)


def _both(run) -> tuple[list[float], list[float], bool]:
    """run() -> (fwd fn, bwd fn, outputs) under SWRGEN_TUNED unset and "0": times and identical outputs."""
    times, outs = [], []
    for setting in (None, "0"):
        if setting is None:
            os.environ.pop(store.ENV_DISABLE, None)
        else:
            os.environ[store.ENV_DISABLE] = setting
        store.clear_memo()  # re-reads the environment; launch plans see the new store generation
        fwd, bwd, out = run()
        times.append((bench_ms(fwd), bench_ms(bwd)))
        outs.append(out)
    os.environ.pop(store.ENV_DISABLE, None)
    store.clear_memo()
    same = all(torch.equal(u, v) for u, v in zip(outs[0], outs[1], strict=True))
    return times[0], times[1], same


def swr_rows(out_dtype: torch.dtype, bw: float) -> list[dict]:
    rows = []
    key = _default_key(16, False, torch.bfloat16, torch.bfloat16, 2, 16, out_dtype)
    for b, h, length in SWR_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(b, h, 16, length, device="cuda", generator=g).bfloat16()
        a = (0.5 + 0.5 * torch.rand(b, h, length, device="cuda", generator=g)).bfloat16()
        dy = torch.randn(b, h, 16, length, device="cuda", generator=g).to(out_dtype)

        def run(a=a, x=x, dy=dy):
            y = swrgen.swr(a, x, out_dtype=out_dtype)
            grads = torch.ops.swrgen.swr_bwd(a, x, dy, 2, 16, key, None)
            return (lambda: swrgen.swr(a, x, out_dtype=out_dtype),
                    lambda: torch.ops.swrgen.swr_bwd(a, x, dy, 2, 16, key, None), (y, *grads))  # fmt: skip

        tuned, untuned, same = _both(run)
        fb = x.numel() * 2 + a.numel() * 2 + x.numel() * dy.element_size()
        bb = 2 * x.numel() * 2 + 2 * a.numel() * 2 + dy.numel() * dy.element_size()
        rows.append(dict(op="swr", out=str(out_dtype).removeprefix("torch."), shape=[b, h, length], tuned=tuned,
                         untuned=untuned, identical=same, floor=[fb / bw * 1e3, bb / bw * 1e3]))  # fmt: skip
    return rows


def fused_rows(bw: float) -> list[dict]:
    rows = []
    key = _default_key(16, False, torch.bfloat16, torch.bfloat16, 2, 16, torch.bfloat16, fused_gating=True)
    for b, length, heads in FUSED_SHAPES:
        layout = GatingLayout(heads, heads, 16)
        g = torch.Generator(device="cuda").manual_seed(0)
        P = torch.randn(b, length, layout.width, device="cuda", generator=g).bfloat16()
        dZ = torch.randn(b, length, layout.inner, device="cuda", generator=g).bfloat16()
        args = (heads, heads, 16, 2, 16, 0.8, key)

        def run(P=P, dZ=dZ, args=args, heads=heads):
            z = swrgen.phalanx_gating(P, heads=heads)
            dP = torch.ops.swrgen.phalanx_bwd(P, dZ, *args)
            return (lambda: swrgen.phalanx_gating(P, heads=heads),
                    lambda: torch.ops.swrgen.phalanx_bwd(P, dZ, *args), (z, dP))  # fmt: skip

        tuned, untuned, same = _both(run)
        fb = (P.numel() + dZ.numel()) * 2  # P in, Z out
        bb = (2 * P.numel() + dZ.numel()) * 2  # P and dZ in, dP out (as bench_fused.py counts)
        rows.append(dict(op="phalanx_gating", out="bf16", shape=[b, length, heads], tuned=tuned, untuned=untuned,
                         identical=same, floor=[fb / bw * 1e3, bb / bw * 1e3]))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.3f} TB/s  torch {torch.__version__}  "
          f"(median ms; % of the copy floor; untuned = SWRGEN_TUNED=0)")  # fmt: skip
    rows = swr_rows(torch.float32, bw) + swr_rows(torch.bfloat16, bw) + fused_rows(bw)
    for r in rows:
        (tf, tb), (uf, ub), (ff, fbw) = r["tuned"], r["untuned"], r["floor"]
        print(f"{r['op']:15s} out={r['out']:8s} {','.join(map(str, r['shape'])):>14s}: "
              f"fwd {tf:.4f} ms {100 * ff / tf:3.0f}% (untuned {uf:.4f} {100 * ff / uf:3.0f}%)  "
              f"bwd {tb:.4f} ms {100 * fbw / tb:3.0f}% (untuned {ub:.4f} {100 * fbw / ub:3.0f}%)  "
              f"identical={r['identical']}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_Bps": bw,
                                               "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
