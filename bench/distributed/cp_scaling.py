"""Context-parallel scaling of one Phalanx layer (D=1024, fused kernels, bf16): forward + backward of one long
sequence split across n GPUs, the halo (the state exchange and its small head / tail calls) shown apart.

    torchrun --nproc_per_node=8 bench/distributed/cp_scaling.py [--tokens 1048576] [--weak-tokens 131072]
                                                                [--json out.json]

The world size comes from the launcher. One launch measures every group size n = 1, 2, 4, ... up to it
(the first n ranks; the others wait at a barrier), so strong and weak scaling come from one run:

* strong: one sequence of ``--tokens`` tokens, n ranks of tokens/n each;
* weak: ``--weak-tokens`` tokens per rank, n * weak-tokens in all.

Per (n, tokens), the slowest rank's median of:
  step_ms     layer(x_slice, cp_group=ctx) and its backward (the CPContext is made once, outside)
  local_ms    the same layer on the same slice with no context parallelism (no exchange, no head / tail)
  halo_fwd_ms / halo_bwd_ms   from the start of a call to the arrival of its incoming state (forward) or
              gradient (backward): the tail / head call plus the wait (``swrgen.distributed.HaloTimer``)
  context_ms  cp_context: the one all-gather of the slice lengths per step (shared by every layer)
and speedup (strong: step_ms at n=1 / step_ms; weak: the same times n, the throughput gain) and efficiency
(speedup / n).
A first check compares the context-parallel output and input gradient with one GPU on a short sequence.
NCCL settings are left as the environment has them. Run without torchrun for a world of one GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

WHAT = "bench/distributed/cp_scaling.py"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=WHAT, description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024, help="model width D (heads = D / 16)")
    ap.add_argument("--kv-heads", type=int, default=16, help="Phalanx kv_heads (B and C shared per group)")
    ap.add_argument("--window-blocks", type=int, default=2, help="k")
    ap.add_argument("--tokens", type=int, default=1 << 20, help="strong scaling: tokens of the one sequence")
    ap.add_argument("--weak-tokens", type=int, default=1 << 17, help="weak scaling: tokens per rank")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="group sizes (default 1, 2, 4, ..., world)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median counts)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--json", default=None, help="write every number here (rank 0)")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke run of the script itself (gloo, float32, host timers; no numbers to keep)",
    )
    return ap


def _sizes(world: int, asked: list[int] | None) -> list[int]:
    if asked:
        bad = [n for n in asked if not 1 <= n <= world]
        if bad:
            raise SystemExit(f"{WHAT}: --sizes {bad} outside 1..{world} (the launcher's world size)")
        return sorted(set(asked))
    sizes, n = [], 1
    while n < world:
        sizes.append(n)
        n *= 2
    return [*sizes, world]


class _Clock:
    """Elapsed ms of what runs between start() and stop(): CUDA events on the GPU, host time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        return (time.perf_counter() - self._t) * 1e3


def _slowest(value: float, group, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def measure(layer, n: int, tokens: int, group, args, device: torch.device, dtype: torch.dtype) -> dict:
    """One (n ranks, tokens) point on a member of ``group`` (its rank r holds slice r of the sequence)."""
    import torch.distributed as dist

    from swrgen.distributed import HaloTimer, context_parallel, cp_context

    rank = dist.get_rank(group)
    per = [tokens // n + (1 if r < tokens % n else 0) for r in range(n)]
    x = torch.randn(1, per[rank], args.dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    ctx = cp_context(group, per[rank])
    clock = _Clock(device)

    def step(cp) -> None:
        layer(x, cp_group=cp).backward(dy)

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.steps):
            dist.barrier(group=group)
            clock.start()
            fn()
            times.append(clock.stop())
        return statistics.median(times)

    step_ms = timed(lambda: step(ctx))
    timer = HaloTimer()
    context_parallel.TIMER = timer
    try:
        for _ in range(args.steps):
            step(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        context_parallel.TIMER = None
    halo = {k: v / args.steps for k, v in timer.totals().items()}
    local_ms = timed(lambda: step(None))
    context_ms = timed(lambda: cp_context(group, per[rank]))
    heads = args.dim // 16

    def slowest(v: float) -> float:
        return _slowest(v, group, device)

    return {
        "ranks": n, "tokens": tokens, "tokens_per_rank": per,
        "step_ms": slowest(step_ms), "local_ms": slowest(local_ms),
        "halo_fwd_ms": slowest(halo["fwd_halo_ms"]), "halo_bwd_ms": slowest(halo["bwd_halo_ms"]),
        "context_ms": slowest(context_ms),
        # The state crossing each edge: [1, H, 16, 2 + 2(k-1)] float32, forward; its gradient backward.
        "state_bytes_per_edge": heads * 16 * 2 * args.window_blocks * 4,
    }  # fmt: skip


def check(layer, group, args, device: torch.device, dtype: torch.dtype) -> float:
    """Max relative error of the context-parallel output and input gradient against one GPU (short sequence)."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens = (4096 if device.type == "cuda" else 64) + 37 * n
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, args.dim, device=device, generator=g).to(dtype)
    dy = torch.randn(1, tokens, args.dim, device=device, generator=g).to(dtype)
    xr = x.clone().requires_grad_()
    ref = layer(xr)
    ref.backward(dy)
    per = [tokens // n + (1 if r < tokens % n else 0) for r in range(n)]
    s = sum(per[:rank])
    xs = x[:, s : s + per[rank]].clone().requires_grad_()
    out = layer(xs, cp_group=group)
    out.backward(dy[:, s : s + per[rank]])
    layer.zero_grad(set_to_none=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    err = max(rel(out, ref[:, s : s + per[rank]]), rel(xs.grad, xr.grad[:, s : s + per[rank]]))
    return _slowest(err, group, device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda":
        common.require_cuda(WHAT)
    import torch.distributed as dist

    from swrgen.distributed.testing import free_port
    from swrgen.nn import Phalanx

    if "RANK" not in os.environ:  # a world of one GPU without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))  # fmt: skip
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        name, nccl = torch.cuda.get_device_name(), ".".join(map(str, torch.cuda.nccl.version()))
    else:
        device, dtype, name, nccl = torch.device("cpu"), torch.float32, "cpu (smoke run)", None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = _sizes(world, args.sizes)
    groups = {n: dist.new_group(list(range(n))) for n in sizes}  # every rank makes every group
    torch.manual_seed(0)
    layer = Phalanx(args.dim, head_dim=16, kv_heads=args.kv_heads, window_blocks=args.window_blocks)
    layer = layer.to(device=device, dtype=dtype)
    if rank == 0:
        print(f"{name} x{world}  torch {torch.__version__}  nccl {nccl}  D={args.dim} k={args.window_blocks} "
              f"kv_heads={args.kv_heads} {dtype}", flush=True)  # fmt: skip
    out: dict = {"device": name, "world": world, "torch": torch.__version__, "nccl": nccl, "dim": args.dim,
                 "window_blocks": args.window_blocks, "kv_heads": args.kv_heads, "dtype": str(dtype), "check": {},
                 "strong": [], "weak": []}  # fmt: skip
    for n in sizes:
        if rank < n:
            err = check(layer, groups[n], args, device, dtype)
            if rank == 0:
                out["check"][n] = err
                print(f"check n={n}: max rel. error vs one GPU {err:.2e}", flush=True)
        dist.barrier()
    for kind, tokens_of in (("strong", lambda n: args.tokens), ("weak", lambda n: args.weak_tokens * n)):
        for n in sizes:
            if rank < n:
                row = measure(layer, n, tokens_of(n), groups[n], args, device, dtype)
                if rank == 0:
                    base = out[kind][0] if out[kind] else row  # the smallest group measured (n = 1 by default)
                    ratio = base["step_ms"] / row["step_ms"]
                    scale = n / base["ranks"]
                    # strong: the same work on n ranks; weak: n times the work on n ranks (throughput gain).
                    row["speedup"] = ratio if kind == "strong" else ratio * scale
                    row["efficiency"] = row["speedup"] / scale
                    out[kind].append(row)
                    print(f"{kind:6s} n={n:2d} L={row['tokens']:9d}: step {row['step_ms']:8.3f} ms  local "
                          f"{row['local_ms']:8.3f} ms  halo fwd {row['halo_fwd_ms']:.3f} bwd "
                          f"{row['halo_bwd_ms']:.3f} ms  context {row['context_ms']:.3f} ms  speedup "
                          f"{row['speedup']:.2f}  efficiency {row['efficiency']:.2f}", flush=True)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            dist.barrier()
    if rank == 0:
        common.write_json(args.json, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
