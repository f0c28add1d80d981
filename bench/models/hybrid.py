"""Model-level training throughput: a ~110M-parameter hybrid LM with Phalanx in the local slots, against the
same model with FlexAttention sliding-window attention there and against pure causal attention (GPU).

    python bench/models/hybrid.py [--lengths 4096 8192 32768] [--tokens 32768] [--json F]

Model: D=768, 12 pre-norm blocks (RMSNorm, mixer, RMSNorm, GELU MLP 4D), vocab 32000 with a tied head.
Every third block (2, 5, 8, 11) is global causal attention (SDPA, head dim 64); the other eight are the
"local" slots: Phalanx (fused kernels, head dim 16, k=2), FlexAttention SWA-512 (head dim 64), or causal
attention too (the pure Transformer). bf16 parameters and activations, AdamW (fused). Each step is
forward + backward + optimizer on a fixed number of tokens per step (batch = tokens / L); the figure is
tokens / median step time (CUDA events, after warm-up steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F
from torch import nn

from bench import common
from bench.alternatives import SWA_WINDOW, Attention

VOCAB, DIM, LAYERS, GLOBAL_EVERY = 32000, 768, 12, 3
LOCALS = ("phalanx", "flex_swa512", "causal")


class Block(nn.Module):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM, bias=False), nn.GELU(), nn.Linear(4 * DIM, DIM, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridLM(nn.Module):
    def __init__(self, local: str, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        blocks = []
        for i in range(LAYERS):
            if i % GLOBAL_EVERY == GLOBAL_EVERY - 1 or local == "causal":
                mixer = Attention(DIM, None, length)
            elif local == "phalanx":
                from swrgen.nn import Phalanx

                mixer = Phalanx(DIM, head_dim=16, window_blocks=2)
            else:
                mixer = Attention(DIM, SWA_WINDOW, length)
            blocks.append(Block(mixer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


def step_ms(local: str, length: int, tokens: int, steps: int, warmup: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = HybridLM(local, length).to(device="cuda", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = max(1, tokens // length)
    data = torch.randint(0, VOCAB, (batch, length + 1), device="cuda")

    def step() -> None:
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/models/hybrid.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 32768], help="sequence lengths L")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens / L)")
    ap.add_argument("--locals", nargs="*", default=list(LOCALS), choices=LOCALS, help="mixers of the local slots")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median counts)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--json", default=None, help="write every number here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/models/hybrid.py")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  D={DIM} layers={LAYERS} "
          f"tokens/step={args.tokens}", flush=True)  # fmt: skip
    rows = []
    for length in args.lengths:
        row: dict = {"L": length, "batch": max(1, args.tokens // length)}
        for local in args.locals:
            try:
                ms, params = step_ms(local, length, args.tokens, args.steps, args.warmup)
                torch.cuda.empty_cache()
            except Exception as err:  # an unavailable alternative is reported, not fatal
                print(f"  {local} at L={length}: unavailable ({type(err).__name__}: {err})", flush=True)
                row[local] = None
                continue
            row[local] = {"step_ms": ms, "tokens_per_s": row["batch"] * length / (ms * 1e-3), "params": params}
        cells = "  ".join(
            f"{n} {row[n]['step_ms']:.1f} ms/step {row[n]['tokens_per_s'] / 1e3:.0f}k tok/s "
            f"({row[n]['params'] / 1e6:.0f}M params)" if row[n] else f"{n} n/a" for n in args.locals
        )  # fmt: skip
        print(f"L={length:6d}: {cells}", flush=True)
        rows.append(row)
    common.write_json(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
