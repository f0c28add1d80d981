"""Run the fused Phalanx kernels at edge lengths and layouts (for compute-sanitizer on the device).

compute-sanitizer --tool memcheck python3 bench/edge_check_fused.py
compute-sanitizer --tool racecheck python3 bench/edge_check_fused.py --quick   # the shared-tile transposes
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import swrgen
from swrgen.ops.phalanx import GatingLayout, launch
from swrgen.spec import default_spec


def fused(k: int, bl: int, dtype: str):
    spec = default_spec(window_blocks=k, block_len=bl, input_dtype=dtype, gate_dtype=dtype, output_dtype=dtype,
                        fused_gating=True)  # fmt: skip
    return swrgen.load(spec).program


def main() -> None:
    quick = "--quick" in sys.argv  # racecheck is slow: the vec kernels' shared tiles at a few shapes
    cases = [(k, 16, "bf16") for k in (1, 2, 3)] + [(2, 64, "fp16"), (3, 32, "fp32")]
    if quick:
        cases = [(2, 16, "bf16"), (2, 64, "fp16")]
    for k, bl, dtype in cases:
        program = fused(k, bl, dtype)
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for heads, kv in ((8, 8), (8, 2), (6, 3)):  # aligned (vec), aligned GQA, unaligned (scalar)
            layout = GatingLayout(heads, kv, 16)
            for length in (17, 1000) if quick else (1, 15, 16, 17, 1000, 2 * bl + 1):
                for offset in (0,) if quick else (0, 1):  # offset 1: misaligned base -> the scalar kernels
                    buf = torch.randn(2 * length * layout.width + offset, device="cuda", dtype=tdt)
                    P = buf[offset:].view(2, length, layout.width)
                    Z = launch.forward(program, P, layout, 0.8)
                    dP = launch.backward(program, P, torch.randn_like(Z), layout, 0.8)
                    torch.cuda.synchronize()
                    assert torch.isfinite(Z).all() and torch.isfinite(dP).all(), (k, bl, dtype, heads, length)
    print("edge_check_fused: ok")


if __name__ == "__main__":
    main()
