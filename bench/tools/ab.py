"""A/B-time kernels of several generated folders or spec files in one run (GPU).

    python bench/tools/ab.py OLD_DIR NEW_DIR [MORE ...] [--shapes 4,64,8192 ...] [--rounds 5]

For a template change: ``swrgen build --no-compile -o .baseline specs/x.yaml`` before the change keeps
the old source (a generated folder loads its own source); after it, compare that folder with the spec.
Programs of one recurrence get the same inputs, must give bitwise-identical y, dx and da (a template
change that alters results is a bug, not a speedup; ``--rounding`` is for a change meant to round
differently: then each program's outputs are checked against float64 at each shape, within the tuner's
tolerances, and the errors printed), and are timed interleaved over ``--rounds`` rounds
so clock and thermal drift hit them alike. Reported: the median over rounds of each do_bench median,
with % of the copy-bandwidth floor (bytes: ``bench.common.swr_bytes``), the ratio to the first of its
group and the rounds' spread (half their range, % of the median). Compare programs only within one run:
between runs (and machines) one kernel has measured up to 5% apart. ``bench/tools/variant.py`` makes
folders with other knobs or template constants.

``--state`` times the state-carrying kernels instead (``*_state``: the path of a chunked prefill or a
training chunk that hands its state on): each sequence continues a random state at a tile edge (so the vector
kernels run) and the forward also writes the new state, the backward takes its gradient and hands back the old
state's; the states' bytes count with the rest.

Fused specs (``fused_gating: true``) time the fused Phalanx kernels instead: B,H,L is P [B, L, N] with H
heads of 16 channels (kv_heads = H, decay_max 0.8); Z and dP must be identical, bytes as
``bench.common.gating_bytes``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

DEFAULT_SHAPES = ["8,64,2048", "4,64,8192", "1,64,32768"]


def program_labels(paths: list[str]) -> list[str]:
    """One distinct label per program: its file or folder name, with the parent folder's name for names
    that repeat (old/hopper_k2 and new/hopper_k2 are folders of one spec). Times are kept per label."""
    names = [Path(p).name.removesuffix(".yaml") for p in paths]
    labels = [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"two programs share a label: {labels}; give each its own folder")
    return labels


def fused_calls(batch: int, heads: int, length: int):
    """Forward and backward calls of the fused kernels on one random P, dZ (bf16) and their bytes, at the
    fused benchmarks' decay_max."""
    from bench.ops.phalanx_gating import DECAY_MAX as decay_max
    from bench.ops.phalanx_gating import gating_inputs
    from swrgen.ops.phalanx import launch as fused

    layout, P, dZ = gating_inputs(batch, length, heads, seed=7)

    def fwd(prog, poison=None):
        return fused.forward(prog, P, layout, decay_max, poison=poison)[:1]

    def bwd(prog, poison=None):
        return fused.backward(prog, P, dZ, layout, decay_max, poison=poison)[:1]

    return fwd, bwd, common.gating_bytes(P, dZ.numel())


def random_states(rec, batch: int, heads: int, head_dim: int):
    """A random state of ``batch`` sequences at tile-aligned positions (phases known: the vector kernels and
    the aligned state backward), and a random gradient for the new one."""
    from swrgen.ops.swr import launch

    g = torch.Generator(device="cuda").manual_seed(3)
    cols = 2 * rec.window_blocks
    data = torch.randn(batch, heads, head_dim, cols, device="cuda", generator=g)
    d_out = torch.randn(batch, heads, head_dim, cols, device="cuda", generator=g)
    positions = [rec.block_len * (5 + 3 * i) for i in range(batch)]  # tile edges
    return launch.StateArgs(data=data, pos=torch.tensor(positions, device="cuda"), phases=(0,) * batch), d_out


def fused_state_calls(rec, batch: int, heads: int, length: int):
    """:func:`fused_calls` through the fused ``*_state`` kernels (as :func:`state_calls`)."""
    from bench.ops.phalanx_gating import DECAY_MAX as decay_max
    from bench.ops.phalanx_gating import gating_inputs
    from swrgen.ops.phalanx import launch as fused

    layout, P, dZ = gating_inputs(batch, length, heads, seed=7)
    state, d_out = random_states(rec, batch, layout.heads, layout.head_dim)

    def fwd(prog, poison=None):
        return fused.forward(prog, P, layout, decay_max, state=state, want_state=True, poison=poison)[:2]

    def bwd(prog, poison=None):
        return fused.backward(prog, P, dZ, layout, decay_max, state=state, d_state_out=d_out, want_d_state=True,
                              poison=poison)  # fmt: skip

    state_bytes = state.data.numel() * state.data.element_size()
    fb, bb = common.gating_bytes(P, dZ.numel())
    return fwd, bwd, (fb + 2 * state_bytes, bb + 3 * state_bytes)


def state_calls(rec, a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, plain_bytes: tuple[int, int]):
    """Forward and backward calls of the ``*_state`` kernels (random states at tile-aligned positions, the new
    state written, its gradient taken and the old one's handed back) and their bytes: the plain call's plus
    the states' (float32 [B, H, DH, 2k]: fwd reads one and writes one, bwd reads two and writes one)."""
    from swrgen.ops.swr import launch

    state, d_out = random_states(rec, *x.shape[:3])

    def fwd(prog, poison=None):
        return launch.forward(prog, a, x, state=state, want_state=True, poison=poison)[:2]

    def bwd(prog, poison=None):
        return launch.backward(prog, a, x, dy, state=state, d_state_out=d_out, want_d_state=True, poison=poison)

    state_bytes = state.data.numel() * state.data.element_size()
    return fwd, bwd, (plain_bytes[0] + 2 * state_bytes, plain_bytes[1] + 3 * state_bytes)


def check_against_float64(label: str, prog, shape: tuple[int, int, int, int]) -> None:
    """Errors of one program against float64 on fresh inputs (the tuner's check, at its check shape for
    ``shape``); exits past its tolerances."""
    from swrgen.tune.search import family_for

    family = family_for(prog.spec)
    dims = family.check_shape(shape)
    fwd_err, bwd_err = family.check(prog, prog.spec, dims, seed=11, device=torch.device("cuda"))
    fwd_tol, bwd_tol = family.tolerances(prog.spec)
    print(f"{label:28s} against float64 at {dims}: fwd {fwd_err:.2e} (limit {fwd_tol:.0e}), "
          f"bwd {bwd_err:.2e} (limit {bwd_tol:.0e})", flush=True)  # fmt: skip
    if not (fwd_err <= fwd_tol and bwd_err <= bwd_tol):
        raise SystemExit(f"{label} is past the float64 tolerances at {dims}")


def spread(times: list[float]) -> float:
    """Half the range of a program's per-round times, in % of their median: how far the rounds disagree. A
    ratio between programs within it is not a difference this run can tell."""
    return 50 * (max(times) - min(times)) / statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("programs", nargs="+", help="generated folders (swrgen build) or spec YAML files")
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="B,H,L (head_dim from the spec)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median counts)")
    ap.add_argument("--state", action="store_true",
                    help="time the *_state kernels: a state in and out at tile edges")  # fmt: skip
    ap.add_argument("--rounding", action="store_true",
                    help="the programs may round differently: check each against float64 instead")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/tools/ab.py")
    import swrgen
    from swrgen import constants
    from swrgen.ops.swr import launch
    from swrgen.tune.search import random_inputs

    labels = program_labels(args.programs)
    ops = [(label, swrgen.load(p)) for label, p in zip(labels, args.programs, strict=True)]
    groups: dict[object, list] = {}
    for label, op in ops:
        groups.setdefault(op.spec.recurrence, []).append((label, op.kernels))
    bw = common.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.3f} TB/s  torch {torch.__version__}  rounds {args.rounds}")
    for rec, members in groups.items():
        for text in args.shapes:
            b, h, length = (int(v) for v in text.split(","))
            shape = (b, h, rec.head_dim, length)
            if rec.fused_gating:
                fwd, bwd, (fb, bb) = fused_state_calls(rec, b, h, length) if args.state else fused_calls(b, h, length)
            else:
                spec = members[0][1].spec
                a, x = random_inputs(spec, shape, seed=7, device=torch.device("cuda"))
                out_dtype = constants.torch_dtype(rec.output_dtype)
                dy = torch.randn(shape, device="cuda").to(out_dtype)
                fb, bb = common.swr_bytes(x, a, out_dtype.itemsize)

                if args.state:
                    fwd, bwd, (fb, bb) = state_calls(rec, a, x, dy, (fb, bb))
                else:

                    def fwd(prog, poison=None, a=a, x=x):
                        return launch.forward(prog, a, x, poison=poison)[:1]

                    def bwd(prog, poison=None, a=a, x=x, dy=dy):
                        return launch.backward(prog, a, x, dy, poison=poison)[:2]

            first = None
            same = {}
            for label, prog in members:
                got = (*fwd(prog, poison=float("nan")), *bwd(prog, poison=float("nan")))
                first = got if first is None else first
                same[label] = all(torch.equal(u, v) for u, v in zip(got, first, strict=True))
                if not same[label] and not args.rounding:
                    raise SystemExit(f"{label} differs from {members[0][0]} at {shape}: not a pure speed change")
                if args.rounding:
                    check_against_float64(label, prog, shape)
            times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in members}
            for _ in range(args.rounds):
                for label, prog in members:
                    f = common.bench_ms(lambda p=prog, fwd=fwd: fwd(p))
                    bk = common.bench_ms(lambda p=prog, bwd=bwd: bwd(p))
                    times[label].append((f, bk))
            base = None
            for label, _ in members:
                fs, bks = [t[0] for t in times[label]], [t[1] for t in times[label]]
                f, bk = statistics.median(fs), statistics.median(bks)
                base = base or (f, bk)
                print(f"{label:28s} k={rec.window_blocks} out={rec.output_dtype} B,H,L={text:>12s}: "
                      f"fwd {f:.4f} ms {100 * fb / bw / f / 1e-3:3.0f}% ({f / base[0]:.3f}x, ±{spread(fs):.1f}%)  "
                      f"bwd {bk:.4f} ms {100 * bb / bw / bk / 1e-3:3.0f}% ({bk / base[1]:.3f}x, ±{spread(bks):.1f}%)  "
                      f"{'identical' if same[label] else 'rounds differently'}",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
