"""Float64 ground truth for the Sliding Window Recurrence (docs/semantics.md).

Per head, with gates ``a_t`` and inputs ``u_t`` (a column of ``x``), tile ``i = t // block_len`` and
``k = window_blocks``::

    y_t = sum_{s = max(0, (i-k+1)*BL) .. t} ( prod_{q=s+1..t} a_q ) * u_s

Layouts: ``x`` is ``[B, H, DH, L]``; ``a`` is ``[B, H, L]`` (per head, shared by the DH channels) or
``[B, H, DH, L]`` (per channel). Everything is in linear space, so any real gate (0, negative, > 1) is
valid: nothing here takes a logarithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_swr_args", "gates_as_4d", "swr_direct", "swr_reference"]


def check_swr_args(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int) -> None:
    """Raise ValueError on shapes or parameters that the semantics do not define."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, DH, L], got shape {tuple(x.shape)}")
    B, H, DH, L = x.shape
    if a.dim() == 3:
        if tuple(a.shape) != (B, H, L):
            raise ValueError(f"per-head gates must be [B, H, L] = {(B, H, L)}, got {tuple(a.shape)}")
    elif a.dim() == 4:
        if tuple(a.shape) != (B, H, DH, L):
            raise ValueError(f"per-channel gates must be [B, H, DH, L] = {(B, H, DH, L)}, got {tuple(a.shape)}")
    else:
        raise ValueError(f"gates must be [B, H, L] or [B, H, DH, L], got shape {tuple(a.shape)}")
    if L < 1:
        raise ValueError("sequence length must be >= 1")
    if int(window_blocks) < 1:
        raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    if int(block_len) < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")


def gates_as_4d(a: torch.Tensor) -> torch.Tensor:
    """Per-head gates [B, H, L] -> [B, H, 1, L] so they broadcast over the DH channels."""
    return a.unsqueeze(2) if a.dim() == 3 else a


def swr_reference(a: torch.Tensor, x: torch.Tensor, window_blocks: int = 2, block_len: int = 16) -> torch.Tensor:
    """``y_t = sum_{s=max(0,(t//BL-k+1)*BL)..t} (prod_{q=s+1..t} a_q) u_s``, in float64.

    O(L * k) time and memory, differentiable by torch autograd in both ``a`` and ``x``. For every tile
    ``i`` the plain recurrence ``h = a_t h + u_t`` is run from zero at the first token of the window
    (start of tile ``i-k+1``) over ``k*BL`` tokens, and tile ``i``'s outputs are its last ``BL`` states.
    This is deliberately not the carrier algorithm of the kernels (see ``tiled.py``): it only restarts
    the textbook recurrence, so the two are independent checks of each other. All tiles run at once;
    the Python loop is over the ``k*BL`` positions of a window.

    Returns float64 ``[B, H, DH, L]``.
    """
    check_swr_args(a, x, window_blocks, block_len)
    BL = int(block_len)
    L = x.shape[-1]
    nt = -(-L // BL)
    k = min(int(window_blocks), nt)  # a window longer than the sequence sees all of it
    a4 = gates_as_4d(a).to(torch.float64)
    u = x.to(torch.float64)
    # Left pad (k-1) tiles of u = 0 so windows of the first tiles start from a zero state (the gate value
    # there is irrelevant; use 1), right pad the partial last tile the same way (outputs are dropped).
    pad = ((k - 1) * BL, nt * BL - L)
    u_p = F.pad(u, pad, value=0.0)
    a_p = F.pad(a4, pad, value=1.0)
    # Window of tile i = padded tokens [i*BL, (i+k)*BL): a strided view [..., nt, k*BL], no copy.
    u_w = u_p.unfold(-1, k * BL, BL)
    a_w = a_p.unfold(-1, k * BL, BL)
    # The recurrence starts at the window's first token (h = u): its gate is in no product of the sum.
    h = u_w[..., 0]
    outs = [h] if k == 1 else []
    for j in range(1, k * BL):
        h = a_w[..., j] * h + u_w[..., j]  # new tensor each step: autograd keeps every h it needs
        if j >= (k - 1) * BL:
            outs.append(h)
    y = torch.stack(outs, dim=-1)  # [B, H, DH, nt, BL]
    return y.reshape(*y.shape[:-2], nt * BL)[..., :L]


def swr_direct(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int) -> torch.Tensor:
    """Same formula as :func:`swr_reference` by the explicit masked transfer operator (O(L^3), tests only).

    ``T[t, s] = prod_{q=s+1..t} a_q`` if ``(t//BL - k + 1)*BL <= s <= t`` else 0, built as a product of
    explicit factors (no cumprod, no division, no logs), then ``y = T @ u``. Returns float64.
    """
    check_swr_args(a, x, window_blocks, block_len)
    k, BL = int(window_blocks), int(block_len)
    L = x.shape[-1]
    a64 = a.to(torch.float64)
    u = x.to(torch.float64)
    t_idx = torch.arange(L, device=x.device).view(L, 1)
    s_idx = torch.arange(L, device=x.device).view(1, L)
    # T has shape [..., L(t), L(s)]; gate a_q is a factor of T[t, s] exactly when s < q <= t.
    T = torch.ones(*a64.shape[:-1], L, L, dtype=torch.float64, device=x.device)
    for q in range(L):
        factor_here = (s_idx < q) & (q <= t_idx)
        T = T * torch.where(factor_here, a64[..., q, None, None], torch.ones((), dtype=torch.float64))
    window = (s_idx <= t_idx) & (s_idx >= (t_idx // BL - k + 1) * BL)
    T = torch.where(window, T, torch.zeros((), dtype=torch.float64))
    if a.dim() == 3:
        return torch.einsum("bhts,bhds->bhdt", T, u)
    return torch.einsum("bhdts,bhds->bhdt", T, u)
