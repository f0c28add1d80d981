"""Fused Phalanx gating: a = dm*sigmoid(P_A), y = SWR(a, sigmoid(P_B)*P_V), Z = y*P_C + P_V on [B, L, N]."""

from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.phalanx.op import phalanx_decode, phalanx_gating

__all__ = ["GatingLayout", "phalanx_decode", "phalanx_gating"]
