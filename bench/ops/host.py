"""Host cost per call of the launch paths at a tiny shape, where a call is all launch overhead (GPU).

    python bench/ops/host.py [--calls 1000] [--repeats 5] [--length 16] [--json out.json]
    python bench/ops/host.py --profile 300     # where a training call's host time goes (cProfile)

Each row: ``--calls`` back-to-back calls between two ``torch.cuda.synchronize()`` (host timer), after a
warm-up; the rows take turns ``--repeats`` times and the table gives each row's median and minimum in us
per call. Shape B=1, H=1, DH=16, L=``--length`` (bf16 inputs, fp32 output); the fused rows use P bf16
[1, L, N] with one head. Rows that need an API the checked-out code lacks are reported as unavailable, so
the same script times an older ``swrgen`` too (for a before/after comparison on one machine).
:func:`tiny_call_costs` is the shorter version ``bench/run.py`` runs as its launch section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """One block: ``calls`` back-to-back calls between two synchronizes, in us per call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def raw_launch(program, a: torch.Tensor, x: torch.Tensor, stream_object: bool) -> Callable[[], Any]:
    """cuLaunchKernel alone, with the forward's args (pointers set once) prebuilt."""
    import ctypes

    from cuda.bindings import driver as cu

    from swrgen.ops.swr import launch

    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    plan = launch.forward_plan(program, a, x)
    kernel, grid, threads, params = plan.kernel, plan.grid, plan.threads, plan.params
    params.x, params.a, params.y = x.data_ptr(), a.data_ptr(), y.data_ptr()
    args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    address = ctypes.addressof(args)
    raw = torch.cuda.current_stream().cuda_stream
    stream = cu.CUstream(raw) if stream_object else raw
    function = kernel.function

    def fn() -> None:
        (err,) = cu.cuLaunchKernel(function, grid, 1, 1, threads, 1, 1, 0, stream, address, 0)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"launch failed: {err}")

    fn._keep = (y, args, params)  # the launches read these
    return fn


def graph_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Replay of a CUDA graph holding one call (warmed on a side stream, as torch's docs ask)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def paths(length: int) -> dict[str, Callable[[], Callable[[], Any]]]:
    """Row name -> maker of the timed callable (a maker may raise: the row is then unavailable)."""
    import swrgen
    from swrgen.ops.phalanx import GatingLayout
    from swrgen.ops.phalanx import launch as fused_launch
    from swrgen.ops.swr import launch
    from swrgen.spec import default_spec

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1, 16, length, device="cuda", generator=g).bfloat16()
    a = (0.5 + 0.5 * torch.rand(1, 1, length, device="cuda", generator=g)).bfloat16()
    op = swrgen.load(default_spec(window_blocks=2))
    layout = GatingLayout(1, 1, 16)
    P = torch.randn(1, length, layout.width, device="cuda", generator=g).bfloat16()
    fused_spec = default_spec(head_dim=16, window_blocks=2, input_dtype="bf16", gate_dtype="bf16",
                              output_dtype="bf16", fused_gating=True)  # fmt: skip
    fused_program = swrgen.load(fused_spec).kernels
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape, device="cuda", generator=g)

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn()

        return call

    def fwd_bwd() -> Any:
        return torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), dy)

    kept = swrgen.swr(ag, xg)  # a graph that autograd.grad may walk again (retain_graph)
    Pg = P.clone().requires_grad_()
    dZ = torch.randn(1, length, layout.inner, device="cuda", generator=g).bfloat16()
    x2 = x.clone().requires_grad_()
    dyb = dy.to(x.dtype)

    def fused_fwd_bwd() -> Any:
        return torch.autograd.grad(swrgen.phalanx_gating(Pg, heads=1), Pg, dZ)

    # Packed: four sequences, the offsets as a list (as the model hands them to every layer).
    cu = [0, length // 4, length // 2, length]

    def packed_fwd_bwd() -> Any:
        return torch.autograd.grad(swrgen.swr(ag, xg, cu_seqlens=cu), (ag, xg), dy)

    def packed_fused_fwd_bwd() -> Any:
        return torch.autograd.grad(swrgen.phalanx_gating(Pg, heads=1, cu_seqlens=cu), Pg, dZ)

    return {
        "swrgen.swr(a, x) inference": lambda: lambda: swrgen.swr(a, x),
        "SwrOp op(a, x) under no_grad": lambda: no_grad(lambda: op(a, x)),
        "launch.forward(kernels, a, x)": lambda: lambda: launch.forward(op.kernels, a, x),
        "torch.empty(x.shape, ...) alone": lambda: lambda: torch.empty(x.shape, dtype=torch.float32, device=x.device),
        "torch.empty_like(x, ...) alone": lambda: (
            lambda: torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)
        ),
        "raw cuLaunchKernel, int stream": lambda: raw_launch(op.kernels, a, x, stream_object=False),
        "raw cuLaunchKernel, CUstream": lambda: raw_launch(op.kernels, a, x, stream_object=True),
        "torch add_ (for scale)": lambda: lambda: x.add_(0),
        "CUDA graph replay of swrgen.swr": lambda: graph_replay(lambda: swrgen.swr(a, x)),
        "swrgen.phalanx_gating(P, heads=1) inference": lambda: lambda: swrgen.phalanx_gating(P, heads=1),
        "fused launch.forward(kernels, P, ...)": lambda: lambda: fused_launch.forward(fused_program, P, layout, 0.8),
        "swrgen.swr fwd+bwd (autograd.grad)": lambda: fwd_bwd,
        "swrgen.swr forward recording a graph": lambda: lambda: swrgen.swr(ag, xg),
        "torch.autograd.grad of it alone": lambda: lambda: torch.autograd.grad(kept, (ag, xg), dy, retain_graph=True),
        "swrgen.phalanx_gating fwd+bwd (autograd.grad)": lambda: fused_fwd_bwd,
        "swrgen.swr(a, x, cu_seqlens=4 sequences) inference": lambda: lambda: swrgen.swr(a, x, cu_seqlens=cu),
        "swrgen.swr packed fwd+bwd (autograd.grad)": lambda: packed_fwd_bwd,
        "swrgen.phalanx_gating packed fwd+bwd (autograd.grad)": lambda: packed_fused_fwd_bwd,
        # The floors any op pays under autograd on this host: a native op, and a custom Function that only
        # allocates its outputs (torch's engine, Function.apply and autograd.grad's checks).
        "torch x * x2 fwd+bwd (autograd.grad), for scale": lambda: lambda: torch.autograd.grad(xg * x2, (xg, x2), dyb),
        "empty autograd.Function fwd+bwd (autograd.grad), for scale": lambda: (
            lambda: torch.autograd.grad(_Alloc.apply(ag, xg), (ag, xg), dy)
        ),
    }


class _Alloc(torch.autograd.Function):
    """The least a custom op does under autograd: allocate its output, and its gradients (no kernel)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, x)
        return torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, x = ctx.saved_tensors
        return torch.empty_like(a), torch.empty_like(x)


def profile_training_call(length: int, calls: int, top: int = 30) -> None:
    """cProfile of ``calls`` training calls (forward + autograd.grad) after a warm-up: the functions with the
    most cumulative and the most own host time. Profiling roughly doubles each call's time."""
    import cProfile
    import pstats

    fwd_bwd = paths(length)["swrgen.swr fwd+bwd (autograd.grad)"]()
    for _ in range(50):
        fwd_bwd()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def tiny_call_costs(log: Callable[[str], None], n: int = 1000) -> dict[str, Any]:
    """The suite's launch section (bench/run.py): host cost per call of the op's paths at B=1, H=1, L=16,
    ``n`` back-to-back calls in one block each, CUDA-graph replays, and the kernel's own time."""
    import swrgen
    from swrgen.ops.swr import launch
    from swrgen.spec import default_spec

    op = swrgen.load(default_spec(window_blocks=2))
    a, x = common.swr_inputs(1, 1, 16)

    def timed(fn: Callable[[], Any], calls: int) -> float:
        for _ in range(20):  # warm-up: first calls build plans and load modules
            fn()
        return per_call_us(fn, calls)

    out: dict[str, Any] = {"shape": [1, 1, common.HEAD_DIM, 16], "calls": n}
    rows: dict[str, Callable[[], Any]] = {
        "swrgen.swr(a, x)": lambda: swrgen.swr(a, x),
        "op(a, x)": lambda: op(a, x),
        "launch.forward(kernels, a, x)": lambda: launch.forward(op.kernels, a, x),
        "torch add_ (for scale)": lambda: x.add_(0),
    }
    for name, fn in rows.items():
        try:
            out[name] = timed(fn, n)
        except Exception as err:
            out[name] = None
            log(f"launch overhead {name}: FAILED {type(err).__name__}: {err}")
    try:  # CUDA graphs: warm on a side stream (as torch's docs ask), capture, time replays
        out["CUDA graph: replay of 1 call"] = timed(graph_replay(lambda: op(a, x)), n)
        hundred = torch.cuda.CUDAGraph()
        with torch.cuda.graph(hundred):
            for _ in range(100):
                op(a, x)
        out["CUDA graph: per call in a 100-call graph"] = timed(hundred.replay, max(1, n // 100)) / 100
    except Exception as err:
        out["CUDA graph error"] = f"{type(err).__name__}: {err}"
        log(f"launch overhead CUDA graph: FAILED {out['CUDA graph error']}")
    try:
        out["kernel time (events, us)"] = 1e3 * common.bench_ms(lambda: launch.forward(op.kernels, a, x), 5, 20)
    except Exception as err:
        log(f"kernel time of the tiny call: FAILED {type(err).__name__}: {err}")
    for key, val in out.items():
        if isinstance(val, float):
            log(f"launch overhead {key}: {val:.1f} us/call")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/ops/host.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="back-to-back calls per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per row, taken in turns")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls per row first")
    ap.add_argument("--length", type=int, default=16, help="tokens L of the tiny call")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead: a cProfile of N training calls (forward + autograd.grad)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/ops/host.py")
    if args.profile:
        profile_training_call(args.length, args.profile)
        return 0
    device = torch.cuda.get_device_name()
    print(f"{device}  torch {torch.__version__}  B=1 H=1 DH=16 L={args.length}  "
          f"{args.calls} calls x {args.repeats} repeats (host timer)")  # fmt: skip
    # Warm every row, then time them round-robin, so that drift of clocks or host load hits all rows alike.
    timed: dict[str, Callable[[], Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, make in paths(args.length).items():
        try:
            fn = make()
            for _ in range(args.warmup):
                fn()
            torch.cuda.synchronize()
            timed[name], rows[name] = fn, {"path": name, "us": []}
        except Exception as err:  # an API this tree lacks, or a failure: reported, not fatal
            first_line = str(err).splitlines()[0] if str(err) else ""
            rows[name] = {"path": name, "error": f"{type(err).__name__}: {first_line}"}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            rows[name]["us"].append(per_call_us(fn, args.calls))
    width = max(len(name) for name in rows)
    print(f"{'path':<{width}}  {'median us':>9}  {'min us':>7}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<{width}}  unavailable ({row['error']})")
            continue
        row["median_us"], row["min_us"] = statistics.median(row["us"]), min(row["us"])
        print(f"{name:<{width}}  {row['median_us']:9.2f}  {row['min_us']:7.2f}")
    common.write_json(
        args.json,
        {
            "device": device,
            "torch": torch.__version__,
            "length": args.length,
            "calls": args.calls,
            "repeats": args.repeats,
            "rows": list(rows.values()),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
