"""Run the kernels at their edge cases, for compute-sanitizer (GPU). Asserts finite outputs; prints "ok".

    compute-sanitizer --tool memcheck --report-api-errors no python bench/tools/edge_check.py
    compute-sanitizer --tool racecheck --report-api-errors no python bench/tools/edge_check.py --only fused --quick

plain: forward and backward of the SWR kernels for k = 1..3 at L in {1, 15, 16, 17, 1000, 8193}, aligned and
misaligned rows (the misaligned ones take the element-wise kernels), packed sequences (cu_seqlens) and
streams resumed at several split points. fused: the Phalanx kernels for k = 1..3 (bf16, BL 16), k = 2 BL 64
fp16 and k = 3 BL 32 fp32, heads/kv-heads 8/8 and 8/2 (vec kernels) and 6/3 (scalar), L in {1, 15, 16, 17,
1000, 2*BL+1}, aligned and misaligned bases. ``--quick`` (for racecheck, which is slow): the fused vec
kernels' shared-tile transposes at a few shapes only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common


def plain() -> None:
    import swrgen
    from swrgen.ops.swr import launch
    from swrgen.spec import default_spec

    for k in (1, 2, 3):
        prog = swrgen.load(default_spec(window_blocks=k)).kernels
        for length in (1, 15, 16, 17, 1000, 8193):
            for offset in (0, 1):  # offset 1 breaks 16-byte alignment -> the element-wise kernels
                x = torch.randn(2, 3, 16, length + offset, device="cuda").bfloat16()[..., offset:]
                a = torch.rand(2, 3, length + offset, device="cuda").bfloat16()[..., offset:]
                y, _, _ = launch.forward(prog, a, x)
                dx, da, _ = launch.backward(prog, a, x, torch.randn_like(y))
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
    print("edge_check plain: ok")


def fused(quick: bool) -> None:
    import swrgen
    from swrgen.ops.phalanx import GatingLayout, launch
    from swrgen.spec import default_spec

    cases = [(k, 16, "bf16") for k in (1, 2, 3)] + [(2, 64, "fp16"), (3, 32, "fp32")]
    if quick:
        cases = [(2, 16, "bf16"), (2, 64, "fp16")]
    for k, bl, dtype in cases:
        spec = default_spec(window_blocks=k, block_len=bl, input_dtype=dtype, gate_dtype=dtype, output_dtype=dtype,
                            fused_gating=True)  # fmt: skip
        program = swrgen.load(spec).kernels
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for heads, kv in ((8, 8), (8, 2), (6, 3)):  # aligned (vec), aligned GQA, unaligned (scalar)
            layout = GatingLayout(heads, kv, 16)
            for length in (17, 1000) if quick else (1, 15, 16, 17, 1000, 2 * bl + 1):
                for offset in (0,) if quick else (0, 1):  # offset 1: misaligned base -> the scalar kernels
                    buf = torch.randn(2 * length * layout.width + offset, device="cuda", dtype=tdt)
                    P = buf[offset:].view(2, length, layout.width)
                    Z, _, _ = launch.forward(program, P, layout, 0.8)
                    dP, _ = launch.backward(program, P, torch.randn_like(Z), layout, 0.8)
                    torch.cuda.synchronize()
                    assert torch.isfinite(Z).all() and torch.isfinite(dP).all(), (k, bl, dtype, heads, length)
    print("edge_check fused: ok")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/tools/edge_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("plain", "fused"), default=None, help="one kernel family (default both)")
    ap.add_argument("--quick", action="store_true", help="fused: a few shapes (racecheck)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.require_cuda("bench/tools/edge_check.py")
    if args.only in (None, "plain"):
        plain()
    if args.only in (None, "fused"):
        fused(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
