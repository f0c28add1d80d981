"""swrgen: a kernel generator for Sliding Window Recurrences (SWR) and the Phalanx layer.

y = swrgen.swr(a, x, window_blocks=2)        # a [B, H, L], x [B, H, DH, L]
op = swrgen.load("specs/hopper_k2.yaml")       # the compiled op for one spec
z = swrgen.phalanx_gating(P, heads=H)         # fused Phalanx gating + SWR on the [B, L, N] projections
"""

from swrgen.ops.phalanx import phalanx_gating
from swrgen.ops.swr import SwrOp, load, swr
from swrgen.spec import Spec, SpecError, load_spec

__version__ = "0.1.0"
__all__ = ["Spec", "SpecError", "SwrOp", "__version__", "load", "load_spec", "phalanx_gating", "swr"]
