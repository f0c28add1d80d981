"""One forward and one backward launch of a spec at one shape (twice), for ncu or nsys (GPU).

    ncu --clock-control none -k regex:swr_ python bench/tools/profile_one.py --shape 4,64,8192 \
        --tune staging=shared,warps_per_cta=1,tiles_per_warp=15,tiles_in_flight=4

``--tune`` takes knob=value,...: integers, true/false, or words such as staging=shared. ``--state`` adds the
``swr_*_state`` kernels' launches (a state read, the new one written, both gradients).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/profile_one.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=common.shape_type("B,H,L"), default=(4, 64, 8192), help="B,H,L")
    ap.add_argument("--k", type=int, default=2, help="window_blocks")
    ap.add_argument("--tune", type=common.parse_knobs, default={}, help="target overrides, knob=value,...")
    ap.add_argument("--state", action="store_true",
                    help="also the *_state kernels, as bench/tools/ab.py --state calls them")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/tools/profile_one.py")
    import swrgen
    from swrgen.ops.swr import launch
    from swrgen.spec import default_spec

    b, h, length = args.shape
    spec = default_spec(window_blocks=args.k)
    prog = swrgen.load(spec.replace_target(**args.tune) if args.tune else spec).kernels
    x = torch.randn(b, h, 16, length, device="cuda").bfloat16()
    a = (0.5 + 0.5 * torch.rand(b, h, length, device="cuda")).bfloat16()
    for _ in range(2):
        y, _, _ = launch.forward(prog, a, x)
        launch.backward(prog, a, x, torch.randn_like(y))
    if args.state:
        from bench.tools.ab import state_calls

        fwd, bwd, _ = state_calls(prog.spec.recurrence, a, x, torch.randn_like(y), (0, 0))
        for _ in range(2):
            fwd(prog)
            bwd(prog)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
