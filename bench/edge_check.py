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
    # Packed sequences (element-wise and vector kernels) and a resumed stream.
    for lens in ([1, 15, 17, 1000, 33], [8, 1024, 40]):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        x = torch.randn(1, 3, 16, int(cu[-1]), device="cuda").bfloat16().requires_grad_()
        a = torch.rand(1, 3, int(cu[-1]), device="cuda").bfloat16().requires_grad_()
        swrgen.swr(a, x, cu_seqlens=cu).sum().backward()
    x = torch.randn(2, 3, 16, 300, device="cuda").bfloat16()
    a = torch.rand(2, 3, 300, device="cuda").bfloat16()
    for split in (7, 8, 16, 100):
        _, st = swrgen.swr(a[..., :split], x[..., :split], return_state=True)
        swrgen.swr(a[..., split:], x[..., split:], initial_state=st)
    torch.cuda.synchronize()
    print("edge_check: ok")


if __name__ == "__main__":
    main()
