"""Run forward+backward at the edge lengths (for compute-sanitizer on the device).

compute-sanitizer --tool memcheck python3 bench/edge_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from swrgen.ops.swr import launch
from swrgen.spec import default_spec


def main() -> None:
    for k in (1, 2, 3):
        prog = swrgen.load(default_spec(window_blocks=k)).program
        for length in (1, 15, 16, 17, 1000, 8193):
            for offset in (0, 1):  # offset 1 breaks 16-byte alignment -> the element-wise kernels
                x = torch.randn(2, 3, 16, length + offset, device="cuda").bfloat16()[..., offset:]
                a = torch.rand(2, 3, length + offset, device="cuda").bfloat16()[..., offset:]
                y = launch.forward(prog, a, x)
                dx, da = launch.backward(prog, a, x, torch.randn_like(y))
                torch.cuda.synchronize()
                assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(da).all()
    print("edge_check: ok")


if __name__ == "__main__":
    main()
