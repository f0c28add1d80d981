"""One forward and one backward launch of a spec at one shape, for ncu.

ncu --clock-control none -k regex:swr_ python3 bench/profile_one.py --shape 4,64,8192 --tune tiles_in_flight=4
(--tune takes knob=value,...: integers, true/false, or words such as staging=shared)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from swrgen.ops.swr import launch
from swrgen.spec import default_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,64,8192")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tune", default="")
    args = ap.parse_args()
    b, h, length = (int(v) for v in args.shape.split(","))
    kw = {}
    for item in filter(None, args.tune.split(",")):
        key, val = item.split("=")
        kw[key] = val.lower() == "true" if val.lower() in ("true", "false") else int(val) if val.isdigit() else val
    spec = default_spec(window_blocks=args.k)
    prog = swrgen.load(spec.replace_target(**kw) if kw else spec).program
    x = torch.randn(b, h, 16, length, device="cuda").bfloat16()
    a = (0.5 + 0.5 * torch.rand(b, h, length, device="cuda")).bfloat16()
    for _ in range(2):
        y = launch.forward(prog, a, x)
        launch.backward(prog, a, x, torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
