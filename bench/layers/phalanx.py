"""Layer-level forward+backward: Phalanx against sliding-window and causal attention layers (GPU).

    python bench/layers/phalanx.py [--dim 1024] [--batch 2] [--lengths 2048 8192 32768] [--json F]
    python bench/layers/phalanx.py --packed [--dim 1024]     # packed (cu_seqlens) vs the same tokens as a batch
    python bench/layers/phalanx.py --chunks 4 [--batch 2]    # chunked training with the state handed over

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
from functools import partial
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
    return time_fn(partial(_train_step, layer, x, torch.randn_like(x)))


def time_fn(step) -> tuple[float, float]:
    """(median GPU ms, host ms to issue one) of ``step()``."""
    gpu = common.bench_ms(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    return gpu, host


def _train_step(layer, x: torch.Tensor, dy: torch.Tensor, **kwargs) -> None:
    layer(x, **kwargs).backward(dy)


def packed_rows(dim: int) -> list[dict]:
    """The Phalanx layer's fwd+bwd on the same tokens as a fixed batch [B, L] and packed [1, B*L]: sequences of
    L (the boundaries of the batch), and documents of random lengths (cu_seqlens of a pretraining batch)."""
    from swrgen.nn import Phalanx

    layer = Phalanx(dim, head_dim=16, window_blocks=2).to(device="cuda", dtype=torch.bfloat16)
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, length in ((8, 8192), (32, 2048)):
        tokens = batch * length
        x = torch.randn(batch, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        xp = x.detach().reshape(1, tokens, dim).requires_grad_()
        even = torch.arange(0, tokens + 1, length, dtype=torch.int64)
        cuts = torch.randint(1, tokens, (batch * 4 - 1,), generator=g).unique().sort().values
        docs = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([tokens])])
        dy, dyp = torch.randn_like(x), torch.randn_like(xp)
        row: dict = {"B": batch, "L": length, "D": dim, "tokens": tokens, "documents": len(docs) - 1}
        steps = {"fixed": partial(_train_step, layer, x, dy),
                 "packed_even": partial(_train_step, layer, xp, dyp, cu_seqlens=even),
                 "packed_docs": partial(_train_step, layer, xp, dyp, cu_seqlens=docs)}  # fmt: skip
        for name, step in steps.items():
            row[name], row[name + "_host"] = time_fn(step)
        for name in ("packed_even", "packed_docs"):
            row[name + "_vs_fixed"] = row[name] / row["fixed"]
        print(f"B={batch} L={length} D={dim}: fixed {row['fixed']:.3f} ms, packed as the batch "
              f"{row['packed_even']:.3f} ms ({row['packed_even_vs_fixed']:.3f}x), {row['documents']} documents "
              f"{row['packed_docs']:.3f} ms "
              f"({row['packed_docs_vs_fixed']:.3f}x)", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def chunked_rows(dim: int, batch: int, chunks: int, length: int = 32768) -> list[dict]:
    """Chunked training: ``chunks`` chunks of length/chunks tokens with the state handed over (gradients
    through it), forward+backward, against one pass over ``length`` tokens."""
    from swrgen.nn import Phalanx

    layer = Phalanx(dim, head_dim=16, window_blocks=2).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    n = length // chunks
    # The chunks as a training loop has them: tensors of their own (a loader's batches), gradients to each.
    xs = [x.detach()[:, c * n : (c + 1) * n].clone().requires_grad_() for c in range(chunks)]
    dys = [dy[:, c * n : (c + 1) * n].contiguous() for c in range(chunks)]

    def one_pass() -> None:
        layer(x).backward(dy)

    def chunked() -> None:
        state, loss = None, 0
        for xc, dyc in zip(xs, dys, strict=True):
            out, state = layer(xc, state=state, return_state=True)
            loss = loss + (out * dyc).sum()
        loss.backward()

    row = {"B": batch, "L": length, "D": dim, "chunks": chunks}
    row["one_pass"], row["one_pass_host"] = time_fn(one_pass)
    row["chunked"], row["chunked_host"] = time_fn(chunked)
    row["chunked_vs_one_pass"] = row["chunked"] / row["one_pass"]
    print(f"B={batch} L={length} D={dim}: one pass {row['one_pass']:.3f} ms, {chunks} chunks with the state "
          f"{row['chunked']:.3f} ms ({row['chunked_vs_one_pass']:.3f}x)", flush=True)  # fmt: skip
    return [row]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/layers/phalanx.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024, help="model width D")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768], help="sequence lengths L")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--packed", action="store_true", help="packed (cu_seqlens) vs the same tokens as a batch")
    ap.add_argument("--chunks", type=int, default=0, help="chunked training with N chunks of --length-total tokens")
    ap.add_argument("--length-total", type=int, default=32768, help="tokens per sequence for --chunks")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/layers/phalanx.py")
    from swrgen.nn import Phalanx

    if args.packed or args.chunks:
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  D={args.dim} (fwd+bwd ms, medians)")
        rows = packed_rows(args.dim) if args.packed else []
        if args.chunks:
            rows += chunked_rows(args.dim, args.batch, args.chunks, args.length_total)
        common.write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
        return 0

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
