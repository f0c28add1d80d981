"""The plain SWR kernels (``swr_fwd_*`` / ``swr_bwd_*``) against the copy-bandwidth floor (GPU).

    python bench/ops/swr.py [--shapes B,H,L ...] [--k 2 3] [--out fp32 bf16] [--tune KNOB=V,...] [--json F]
    python bench/ops/swr.py --sweep [--grid "tiles_in_flight=2,4;tiles_per_warp=64,128"] [--k 2] [--shapes ...]
    python bench/ops/swr.py --tuned [--json F]
    python bench/ops/swr.py --copy-sizes [--out fp32 bf16]   # a copy of each direction's bytes vs 1 GiB

Default: forward and backward of the default spec for each k and output dtype, with the spec's own knobs
(``--tune`` overrides some), at (8,64,2048) (4,64,8192) (1,64,32768) (1,128,131072): median ms, % of the
floor and the floor itself. ``--sweep``: a grid of tuning configs at one shape (4,64,8192 unless
``--shapes``), every config's y, dx and da checked bitwise against the first one's. ``--tuned``: the ops'
own path (``swrgen.swr`` forward, the registered backward op) with the stored tuned configs and with
``SWRGEN_TUNED=0``, fp32 and bf16 output, outputs required bitwise equal. Inputs bf16, DH = 16, per-head
gates U(0.5, 1); bytes as ``bench.common.swr_bytes`` counts them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

DEFAULT_SHAPES = [(8, 64, 2048), (4, 64, 8192), (1, 64, 32768), (1, 128, 131072)]
SWEEP_SHAPE = (4, 64, 8192)
# The sweep's grid: knob -> values (--grid replaces the values of the knobs it names).
GRID: dict[str, tuple[Any, ...]] = dict(tiles_in_flight=(2, 4), warps_per_cta=(4, 8),
                                        tiles_per_warp=(32, 64, 128, 256), persistent=(False,))  # fmt: skip
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_kernels(fwd_program, bwd_program, shape: tuple[int, int, int], bw: float, warmup_ms: float = 25.0,
                 rep_ms: float = 100.0) -> dict[str, float]:  # fmt: skip
    """Forward and backward medians of the kernels of two programs (one per direction: the ops may launch
    tuned knobs for each) at (B, H, L), with bytes, floors, % of the floor and GB/s."""
    from swrgen.ops.swr import launch

    b, h, length = shape
    a, x = common.swr_inputs(b, h, length)
    y, _, _ = launch.forward(fwd_program, a, x)
    dy = torch.randn_like(y)
    fwd = common.bench_ms(lambda: launch.forward(fwd_program, a, x), warmup_ms, rep_ms)
    bwd = common.bench_ms(lambda: launch.backward(bwd_program, a, x, dy), warmup_ms, rep_ms)
    fb, bb = common.swr_bytes(x, a, y.element_size())
    return dict(fwd_ms=fwd, bwd_ms=bwd, fwd_bytes=fb, bwd_bytes=bb, fwd_floor_ms=fb / bw * 1e3,
                bwd_floor_ms=bb / bw * 1e3, fwd_pct=common.pct_of_floor(fb, bw, fwd),
                bwd_pct=common.pct_of_floor(bb, bw, bwd), fwd_GBps=fb / (fwd * 1e-3) / 1e9,
                bwd_GBps=bb / (bwd * 1e-3) / 1e9)  # fmt: skip


# ------------------------------------------------------------------ default: the roofline table


def roofline(args: argparse.Namespace, bw: float) -> list[dict]:
    import swrgen
    from swrgen.spec import default_spec

    rows = []
    for k in args.k or [2]:
        for out in args.out or ["fp32"]:
            spec = default_spec(window_blocks=k, output_dtype=out)
            if args.tune:
                spec = spec.replace_target(**args.tune)
            program = swrgen.load(spec).kernels
            for b, h, length in args.shapes or DEFAULT_SHAPES:
                row: dict[str, Any] = dict(k=k, out=out, B=b, H=h, L=length)
                row.update(time_kernels(program, program, (b, h, length), bw))
                rows.append(row)
                print(f"k={k} out={out} B={b} H={h} L={length}: fwd {row['fwd_ms']:.4f} ms ({row['fwd_pct']:.0f}% "
                      f"of floor {row['fwd_floor_ms']:.4f}) bwd {row['bwd_ms']:.4f} ms ({row['bwd_pct']:.0f}% of "
                      f"floor {row['bwd_floor_ms']:.4f})", flush=True)  # fmt: skip
    return rows


# ------------------------------------------------------------------ --sweep: a grid of tuning configs


def sweep_specs(k: int, grid: dict[str, tuple[Any, ...]] | None = None) -> list:
    """The default spec of window k with every combination of ``grid`` (GRID by default) that validates."""
    from swrgen.spec import SpecError, default_spec

    grid = grid or GRID
    base = default_spec(window_blocks=k)
    specs = []
    for vals in itertools.product(*grid.values()):
        try:
            specs.append(base.replace_target(**dict(zip(grid, vals, strict=True))))
        except SpecError as err:  # an impossible combination (e.g. registers budget): say so, time the rest
            print(f"skipped {dict(zip(grid, vals, strict=True))}: {err}", flush=True)
    return specs


def sweep(args: argparse.Namespace, bw: float) -> list[dict]:
    import swrgen
    from swrgen.ops.swr import launch
    from swrgen.tune.space import parse_grid

    try:
        grid = {**GRID, **parse_grid(args.grid)}
    except ValueError as err:
        raise SystemExit(f"--grid: {err}") from None
    rows = []
    for k in args.k or [2]:
        for b, h, length in args.shapes or [SWEEP_SHAPE]:
            a, x = common.swr_inputs(b, h, length)
            fb, bb = common.swr_bytes(x, a, 4)  # the default spec's fp32 output
            ref = None
            print(f"{torch.cuda.get_device_name()} copy {bw / 1e12:.3f} TB/s; k={k} B,H,L={b},{h},{length}")
            for spec in sweep_specs(k, grid):
                prog = swrgen.load(spec).kernels
                y, _, _ = launch.forward(prog, a, x)
                dy = torch.ones_like(y) * 0.5
                got = (y, *launch.backward(prog, a, x, dy)[:2])
                ref = ref or got
                same = all(torch.equal(u, v) for u, v in zip(got, ref, strict=True))
                f = common.bench_ms(lambda p=prog, a=a, x=x: launch.forward(p, a, x))
                bk = common.bench_ms(lambda p=prog, a=a, x=x, dy=dy: launch.backward(p, a, x, dy))
                t = spec.target
                extra = (f" S={t.staging}/{t.stages}" if t.staging != "registers" else "") + (
                    f" M={t.min_warps_per_sm}" if t.min_warps_per_sm else "")  # fmt: skip
                print(f"F={t.tiles_in_flight} W={t.warps_per_cta} T={t.tiles_per_warp:3d} P={int(t.persistent)}"
                      f"{extra}: fwd {f:.4f} ms {common.pct_of_floor(fb, bw, f):4.0f}%  bwd {bk:.4f} ms "
                      f"{common.pct_of_floor(bb, bw, bk):4.0f}%  identical={same}", flush=True)  # fmt: skip
                rows.append(dict(k=k, B=b, H=h, L=length, target=t.to_dict(), fwd_ms=f, bwd_ms=bk, identical=same))
    return rows


# ------------------------------------------------------------------ --tuned: what the stored configs buy


def tuned_rows(args: argparse.Namespace, bw: float) -> list[dict]:
    import swrgen
    from swrgen.ops.swr.op import default_key

    rows = []
    for k in args.k or [2]:
        for out in args.out or ["fp32", "bf16"]:
            out_dtype = OUT_DTYPES[out]
            key = default_key(16, False, torch.bfloat16, torch.bfloat16, k, 16, out_dtype)
            for b, h, length in args.shapes or DEFAULT_SHAPES:
                a, x = common.swr_inputs(b, h, length)
                g = torch.Generator(device="cuda").manual_seed(1)
                dy = torch.randn(b, h, 16, length, device="cuda", generator=g).to(out_dtype)

                def run(a=a, x=x, dy=dy, key=key, out_dtype=out_dtype, k=k):
                    y = swrgen.swr(a, x, window_blocks=k, out_dtype=out_dtype)
                    args = (a, x, dy, None, None, None, None, k, 16, key, False)  # no state, no packing
                    grads = torch.ops.swrgen.swr_bwd(*args)[:2]
                    return (lambda: swrgen.swr(a, x, window_blocks=k, out_dtype=out_dtype),
                            lambda: torch.ops.swrgen.swr_bwd(*args), (y, *grads))  # fmt: skip

                (tf, tb), (uf, ub), same = common.tuned_and_untuned(run)
                fb, bb = common.swr_bytes(x, a, dy.element_size())
                rows.append(dict(op="swr", k=k, out=out, shape=[b, h, length], tuned=[tf, tb], untuned=[uf, ub],
                                 identical=same, floor=[fb / bw * 1e3, bb / bw * 1e3]))  # fmt: skip
                print_tuned(rows[-1])
    return rows


def print_tuned(r: dict) -> None:
    """One line of a --tuned table (also bench/ops/phalanx_gating.py's)."""
    (tf, tb), (uf, ub), (ff, fbw) = r["tuned"], r["untuned"], r["floor"]
    print(f"{r['op']:15s} out={r['out']:8s} {','.join(map(str, r['shape'])):>14s}: "
          f"fwd {tf:.4f} ms {100 * ff / tf:3.0f}% (untuned {uf:.4f} {100 * ff / uf:3.0f}%)  "
          f"bwd {tb:.4f} ms {100 * fbw / tb:3.0f}% (untuned {ub:.4f} {100 * fbw / ub:3.0f}%)  "
          f"identical={r['identical']}", flush=True)  # fmt: skip


# ------------------------------------------------------------------ main


# ------------------------------------------------------------------ --autograd: the path training takes


AUTOGRAD_CASES = [((4, 64, 8192), "fp32"), ((8, 64, 2048), "bf16"), ((1, 64, 32768), "fp32"), ((8, 64, 2048), "fp32"),
                  ((4, 64, 8192), "bf16"), ((1, 128, 131072), "fp32")]  # fmt: skip


def _autograd_steps(fwd_ks, bwd_ks, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, out_dtype: torch.dtype):
    """(name, step) of each path ``autograd_rows`` times: the kernels alone, the op, the op under autograd."""
    import swrgen
    from swrgen.ops.swr import launch

    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    y = swrgen.swr(ag, xg, out_dtype=out_dtype)
    return [("kernel_fwd", lambda: launch.forward(fwd_ks, a, x)),
            ("kernel_bwd", lambda: launch.backward(bwd_ks, a, x, dy)),
            ("kernel_fwd_bwd", lambda: (launch.forward(fwd_ks, a, x), launch.backward(bwd_ks, a, x, dy))),
            ("op_fwd_inference", lambda: swrgen.swr(a, x, out_dtype=out_dtype)),
            ("autograd_fwd", lambda: swrgen.swr(ag, xg, out_dtype=out_dtype)),
            ("autograd_bwd", lambda: torch.autograd.grad(y, (ag, xg), dy, retain_graph=True)),
            ("autograd_fwd_bwd", _training_call(a, x, dy, out_dtype))]


def _training_call(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, out_dtype: torch.dtype):
    """A training call (forward + ``autograd.grad``) on fresh leaves of ``a`` and ``x``."""
    import swrgen

    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    return lambda: torch.autograd.grad(swrgen.swr(ag, xg, out_dtype=out_dtype), (ag, xg), dy)


def autograd_rows(args: argparse.Namespace, bw: float) -> list[dict]:
    """What training sees against the kernels launched directly: the forward and backward through autograd
    (``torch.autograd.grad`` with a dense upstream gradient) against ``launch.forward`` / ``launch.backward`` of
    the same kernel set and shape, GPU medians of calls timed alone and (the backward, the training call) of
    calls issued back to back (``common.stream_ms``: what a training loop sees while its host keeps ahead),
    also with autograd's device threads off, and of a training call in a CUDA graph (``host.graph_replay``:
    no host time) against the two kernels; and the host time to issue
    one training call (fwd + bwd), and a backward alone, beside an inference call, at a tiny shape where the
    host is all there is."""
    import swrgen
    from bench.ops.host import graph_replay
    from swrgen.ops.swr.op import default_kernels

    rows, graphed = [], []
    cases = [(s, o) for s in args.shapes for o in (args.out or ["fp32"])] if args.shapes else AUTOGRAD_CASES
    for (b, h, length), out in cases:
        out_dtype = OUT_DTYPES[out]
        a, x = common.swr_inputs(b, h, length)
        ks = default_kernels(16, False, x.dtype, a.dtype, 2, 16, out_dtype)
        fwd_ks, bwd_ks = (ks.for_shape(x.get_device(), tuple(x.shape), d) for d in ("fwd", "bwd"))
        dy = torch.randn(x.shape, device="cuda").to(out_dtype)
        steps = dict(_autograd_steps(fwd_ks, bwd_ks, a, x, dy, out_dtype))
        t = {name: common.bench_ms(step) for name, step in steps.items()}
        # Back to back, as a training loop issues them: the host's time per call hides unless it is the longer.
        streamed = ("kernel_bwd", "autograd_bwd", "kernel_fwd_bwd", "autograd_fwd_bwd")
        t.update({f"{name}_stream": common.stream_ms(steps[name]) for name in streamed})
        # The same with autograd's device threads off (the backward on the calling thread: one GPU a process).
        with torch.autograd.set_multithreading_enabled(False):
            t.update({f"{name}_stream_nothreads": common.stream_ms(steps[name]) for name in streamed[1::2]})
        fb, bb = common.swr_bytes(x, a, dy.element_size())
        row = dict(B=b, H=h, L=length, out=out, **t, fwd_floor_ms=fb / bw * 1e3, bwd_floor_ms=bb / bw * 1e3,
                   bwd_autograd_over_kernel=t["autograd_bwd"] / t["kernel_bwd"],
                   bwd_stream_autograd_over_kernel=t["autograd_bwd_stream"] / t["kernel_bwd_stream"],
                   train_stream_autograd_over_kernels=t["autograd_fwd_bwd_stream"] / t["kernel_fwd_bwd_stream"],
                   train_stream_nothreads_over_kernels=(t["autograd_fwd_bwd_stream_nothreads"]
                                                        / t["kernel_fwd_bwd_stream"]),
                   fwd_autograd_over_kernel=t["autograd_fwd"] / t["kernel_fwd"])  # fmt: skip
        rows.append(row)
        print(f"{b}x{h}x{length} {out}: fwd kernel {t['kernel_fwd']:.4f} / autograd {t['autograd_fwd']:.4f} ms "
              f"({row['fwd_autograd_over_kernel']:.3f}x); bwd kernel {t['kernel_bwd']:.4f} / autograd "
              f"{t['autograd_bwd']:.4f} ms ({row['bwd_autograd_over_kernel']:.3f}x), back to back "
              f"{t['kernel_bwd_stream']:.4f} / {t['autograd_bwd_stream']:.4f} ms "
              f"({row['bwd_stream_autograd_over_kernel']:.3f}x); fwd+bwd {t['autograd_fwd_bwd']:.4f} ms "
              f"(kernels {t['kernel_fwd'] + t['kernel_bwd']:.4f}), back to back {t['autograd_fwd_bwd_stream']:.4f} "
              f"({row['train_stream_autograd_over_kernels']:.3f}x the kernels'), autograd's device threads off "
              f"{t['autograd_fwd_bwd_stream_nothreads']:.4f} ({row['train_stream_nothreads_over_kernels']:.3f}x)",
              flush=True)  # fmt: skip
        graphed.append((row, a, x, dy, out_dtype))
    from bench.ops.host import per_call_us

    a, x = common.swr_inputs(1, 1, 16)
    ag, xg = a.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape, device="cuda")
    y = swrgen.swr(ag, xg)
    host = {"inference call": per_call_us(lambda: swrgen.swr(a, x), 2000),
            "training call (fwd + autograd.grad)": per_call_us(
                lambda: torch.autograd.grad(swrgen.swr(ag, xg), (ag, xg), dy), 500),
            "backward alone (autograd.grad, retain_graph)": per_call_us(
                lambda: torch.autograd.grad(y, (ag, xg), dy, retain_graph=True), 500),
            "torch add_ (for scale)": per_call_us(lambda: x.add_(0), 2000)}  # fmt: skip
    for name, us in host.items():
        print(f"host {name}: {us:.1f} us/call", flush=True)
    rows.append({"host_us": host, "shape": [1, 1, 16, 16]})
    # Last (a capture torch refuses leaves the process unfit for more): each training call captured in a CUDA
    # graph, its GPU time alone against the two kernels. Fresh leaves: a leaf's AccumulateGrad node keeps the
    # stream it was made on, and one made on the default stream (by the rows above, whose retained graph holds
    # it) would have the captured gradients synced into that stream, across the capture (pytorch/pytorch#164302).
    for row, a, x, dy, out_dtype in graphed:
        try:
            row["graphed_fwd_bwd"] = common.bench_ms(graph_replay(_training_call(a, x, dy, out_dtype)))
        except RuntimeError as e:
            print(f"no CUDA graph of the training call: {str(e).splitlines()[0]}", flush=True)
            break
        row["graphed_over_kernels"] = row["graphed_fwd_bwd"] / (row["kernel_fwd"] + row["kernel_bwd"])
        print(f"{row['B']}x{row['H']}x{row['L']} {row['out']}: training call in a CUDA graph "
              f"{row['graphed_fwd_bwd']:.4f} ms ({row['graphed_over_kernels']:.3f}x the kernels)", flush=True)
    return rows


def copy_size_rows(args: argparse.Namespace, bw: float) -> list[dict]:
    """A device copy of the same bytes as each shape's forward and backward, against the 1 GiB copy that
    sets the floors: how much of the floor a launch of that size can reach at all (ramp and tail)."""
    rows = []
    for (b, h, length), out in [(s, o) for s in (args.shapes or DEFAULT_SHAPES) for o in (args.out or ["fp32"])]:
        a, x = common.swr_inputs(b, h, length)
        fb, bb = common.swr_bytes(x, a, torch.empty((), dtype=OUT_DTYPES[out]).element_size())
        del a, x
        fwd, bwd = common.copy_bandwidth(fb), common.copy_bandwidth(bb)
        rows.append(dict(B=b, H=h, L=length, out=out, fwd_bytes=fb, bwd_bytes=bb, fwd_copy_Bps=fwd, bwd_copy_Bps=bwd))
        print(f"{b}x{h}x{length} {out}: a copy of the forward's {fb / 1e6:.0f} MB runs at {fwd / bw:.1%} of the "
              f"1 GiB copy, of the backward's {bb / 1e6:.0f} MB at {bwd / bw:.1%}", flush=True)  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/ops/swr.py", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="time a grid of tuning configs (see --grid)")
    mode.add_argument("--tuned", action="store_true", help="the ops' path with and without the stored tuned configs")
    mode.add_argument("--autograd", action="store_true", help="the training path (autograd) against the kernels alone")
    mode.add_argument("--copy-sizes", action="store_true",
                      help="a copy of each direction's bytes against the 1 GiB copy")  # fmt: skip
    ap.add_argument("--shapes", nargs="*", type=common.shape_type("B,H,L"), default=[],
                    help="B,H,L shapes (default: the four of the table; --sweep: 4,64,8192)")  # fmt: skip
    ap.add_argument("--k", type=int, nargs="*", default=[], help="window_blocks (default 2)")
    ap.add_argument("--out", nargs="*", default=[], choices=sorted(OUT_DTYPES),
                    help="output dtypes (default fp32; --tuned: fp32 bf16)")  # fmt: skip
    ap.add_argument("--tune", type=common.parse_knobs, default={},
                    help="target overrides for the table, e.g. tiles_per_warp=15,staging=shared")  # fmt: skip
    ap.add_argument("--grid", default="", help='--sweep: knob values, e.g. "tiles_in_flight=2,4;tiles_per_warp=64"')
    ap.add_argument("--json", default=None, help="write every number here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/ops/swr.py")
    bw = common.copy_bandwidth()
    if not args.sweep:
        print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s  torch {torch.__version__}"
              + ("  (median ms; % of the copy floor; untuned = SWRGEN_TUNED=0)" if args.tuned else ""))  # fmt: skip
    if args.sweep:
        rows = sweep(args, bw)
    elif args.tuned:
        rows = tuned_rows(args, bw)
    elif args.autograd:
        rows = autograd_rows(args, bw)
    elif args.copy_sizes:
        rows = copy_size_rows(args, bw)
    else:
        rows = roofline(args, bw)
    common.write_json(args.json, {"device": torch.cuda.get_device_name(), "copy_Bps": bw, "torch": torch.__version__,
                                  "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
