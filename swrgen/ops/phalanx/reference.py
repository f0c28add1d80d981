"""The fused gating in plain torch, on top of the SWR reference (CPU path and ground truth).

    a = decay_max * sigmoid(P_A)      [B, L, H]
    u = sigmoid(P_B) * P_V            [B, L, H, DH]   (B shared by the heads of a kv-group)
    y = SWR(a, u)                     the jagged window of window_blocks tiles of block_len tokens
    Z = y * P_C + P_V                 [B, L, H * DH]  (C shared like B)

``phalanx_gating_reference`` is differentiable by autograd (float64 ground truth).
"""

from __future__ import annotations

import torch

from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.swr.reference import swr_reference

__all__ = ["phalanx_gating_reference", "split_projections"]


def split_projections(P: torch.Tensor, layout: GatingLayout):
    """(P_A [B, L, H], P_B, P_C [B, L, H, DH] expanded over kv-groups, P_V [B, L, H, DH])."""
    pa, pb, pc, pv = torch.split(P, layout.split, dim=-1)
    lead = P.shape[:-1]
    g, kv, dh = layout.kv_group, layout.kv_heads, layout.head_dim

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, kv, 1, dh).expand(*lead, kv, g, dh).reshape(*lead, layout.heads, dh)

    return pa, expand(pb), expand(pc), pv.reshape(*lead, layout.heads, dh)


def _gates(P: torch.Tensor, layout: GatingLayout):
    pa, pb, pc, pv = split_projections(P, layout)
    sa, sb = torch.sigmoid(pa), torch.sigmoid(pb)
    return sa, sb, pc, pv


def phalanx_gating_reference(P: torch.Tensor, layout: GatingLayout, window_blocks: int, block_len: int,
                             decay_max: float) -> torch.Tensor:  # fmt: skip
    """Z [B, L, H*DH] in float64, differentiable in P."""
    P = P.to(torch.float64)
    sa, sb, pc, pv = _gates(P, layout)
    a = (decay_max * sa).transpose(1, 2)  # [B, H, L]
    u = (sb * pv).permute(0, 2, 3, 1)  # [B, H, DH, L]
    y = swr_reference(a, u, window_blocks, block_len).permute(0, 3, 1, 2)  # [B, L, H, DH]
    Z = y * pc + pv
    return Z.reshape(*P.shape[:-1], layout.inner)
