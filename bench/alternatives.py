"""What a user would run instead of the generated SWR kernels, set up for the benchmark suite.

Each ``make_*`` returns a :class:`Case` (forward callable, optional backward callable) for a model shape
(B, H, L) with head_dim 16, or raises :class:`Unavailable` with the reason (package missing, too big).
Optional packages are imported inside the makers, so this module imports on any machine.

* ``torch_fp32`` / ``torch_fp32_compile``: :func:`swr_torch_fp32`, the same jagged-window SWR in plain
  fp32 torch (tile-local transfer matrices by cumprod, one batched matmul, Horner carries), eager and
  under ``torch.compile``.
* ``accelerated_scan``: the full linear recurrence, ``accelerated_scan`` Triton scan, [B, H*DH, L] fp32.
* ``hgrn``: flash-linear-attention ``chunk_hgrn`` (full recurrence, log-space gates), [B, L, H*DH] bf16.
* ``flex_swa``: FlexAttention sliding-window causal attention (window 512) at model width D = H*16,
  head dim 64 (D/64 heads), bf16 [B, heads, L, 64].
* ``sdpa``: ``scaled_dot_product_attention`` causal, same layout.

:class:`Attention` is the attention *layer* the layer and model benchmarks put beside Phalanx: QKV projection,
SDPA causal or FlexAttention sliding-window attention, output projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench import common

HEAD_DIM = common.HEAD_DIM
DEVICE = "cuda"  # the suite's device; CPU smoke tests set "cpu"
ATTN_HEAD_DIM = 64
SWA_WINDOW = 512


class Unavailable(Exception):
    """This alternative cannot run here (the message says why)."""


@dataclasses.dataclass
class Case:
    fwd: Callable[[], Any]
    bwd: Callable[[], Any] | None
    dtype: str
    layout: str
    note: str = ""


# ------------------------------------------------------------------ the SWR in plain fp32 torch


def _shift_tiles(t: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    """out[i] = t[i - p] along ``dim`` (the tile axis), zero-filled: tiles before the start carry 0."""
    n = t.shape[dim]
    if p >= n:
        return torch.zeros_like(t)
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [p, 0]
    return F.pad(t.narrow(dim, 0, n - p), pad)


def swr_torch_fp32(a: torch.Tensor, x: torch.Tensor, k: int, bl: int = 16) -> torch.Tensor:
    """The SWR (docs/semantics.md) in fp32 torch ops: y [B, H, DH, L] fp32 from a [B, H, L] or [B, H, DH, L].

    Per tile: the transfer matrix ``T[r, c] = prod_{q=c+1..r} a_q`` (r >= c) is a column-wise cumprod of
    ``M[r, c] = a_r if r > c else 1``, masked to the lower triangle: exact for any real gate (no logs,
    no division). ``w = T u`` (one batched matmul per head, shared by its DH channels), carriers
    ``v_i = w[last]``, ``P_i = prod of tile i's gates``, carry into tile i by Horner's rule
    ``C_i = v_{i-1} + P_{i-1} (v_{i-2} + ...)`` over k-1 tiles, ``y = w + g * C`` with ``g`` the in-tile
    inclusive prefix product. Differentiable by autograd.
    """
    k, bl = int(k), int(bl)
    batch, heads, head_dim, length = x.shape
    nt = -(-length // bl)
    pad = nt * bl - length
    xf = F.pad(x.float(), (0, pad))  # partial last tile: x = 0, gate = 1 (outputs there are dropped)
    af = F.pad(a.float(), (0, pad), value=1.0)
    at = af.reshape(*af.shape[:-1], nt, bl)  # [B, H, (DH,) nt, BL]
    idx = torch.arange(bl, device=x.device)
    strict_lower = idx[:, None] > idx[None, :]
    lower = idx[:, None] >= idx[None, :]
    m = torch.where(strict_lower, at.unsqueeze(-1), torch.ones((), device=x.device))  # [..., nt, r, c]
    tmat = torch.where(lower, m.cumprod(dim=-2), torch.zeros((), device=x.device))
    g = at.cumprod(dim=-1)  # [..., nt, BL]
    if a.dim() == 3:  # per head: u [B, H, nt, DH, BL]; w[d, r] = sum_c T[r, c] u[d, c]
        u = xf.reshape(batch, heads, head_dim, nt, bl).transpose(2, 3)
        w = u @ tmat.transpose(-1, -2)  # [B, H, nt, DH, BL]
        v = w[..., -1]  # [B, H, nt, DH]
        p = g[..., -1].unsqueeze(-1)  # [B, H, nt, 1]
        carry = torch.zeros_like(v)
        for j in range(k - 1, 0, -1):
            carry = _shift_tiles(v, j, 2) + _shift_tiles(p, j, 2) * carry
        y = w + g.unsqueeze(3) * carry.unsqueeze(-1)  # [B, H, nt, DH, BL]
        y = y.transpose(2, 3).reshape(batch, heads, head_dim, nt * bl)
    else:  # per channel: a transfer matrix per channel
        u = xf.reshape(batch, heads, head_dim, nt, bl)
        w = (tmat @ u.unsqueeze(-1)).squeeze(-1)  # [B, H, DH, nt, BL]
        v = w[..., -1]
        p = g[..., -1]
        carry = torch.zeros_like(v)
        for j in range(k - 1, 0, -1):
            carry = _shift_tiles(v, j, 3) + _shift_tiles(p, j, 3) * carry
        y = (w + g * carry.unsqueeze(-1)).reshape(batch, heads, head_dim, nt * bl)
    return y[..., :length]


# ------------------------------------------------------------------ cases


def _free_bytes() -> int:
    if DEVICE == "cpu":
        return 1 << 62
    free, _total = torch.cuda.mem_get_info()
    return free


def _allow_repeated_compiled_backward() -> None:
    """Compiled backwards donate their buffers by default, which forbids retain_graph (our repeated calls)."""
    try:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):
        pass


def _grad_fn(out: torch.Tensor, leaves: list[torch.Tensor], seed: int = 7) -> Callable[[], Any]:
    """Backward alone: the graph is built once; each call runs only the backward kernels."""
    g = torch.Generator(device=out.device).manual_seed(seed)
    dout = torch.randn(out.shape, device=out.device, generator=g).to(out.dtype)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def swr_inputs(batch: int, heads: int, length: int, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gates U(0.5, 1) [B, H, L] and x ~ N(0, 1) [B, H, 16, L] on DEVICE, as the generated-kernel benchmark uses."""
    return common.swr_inputs(batch, heads, length, dtype, seed, DEVICE)


def make_torch_fp32(batch: int, heads: int, length: int, *, k: int = 2, compiled: bool = False,
                    bwd: bool = True) -> Case:  # fmt: skip
    # Peak of the eager forward: x, w, y, carries (fp32, ~6 copies of x) + 3 transfer-matrix sized temps.
    need = batch * heads * length * (HEAD_DIM * 4 * 6 + 16 * 4 * 3) * (3 if bwd else 1)
    if need > 0.8 * _free_bytes():
        raise Unavailable(f"would need ~{need / 2**30:.0f} GiB of GPU memory")
    a, x = swr_inputs(batch, heads, length, torch.float32)
    fn = swr_torch_fp32
    if compiled:
        _allow_repeated_compiled_backward()
        # dynamic=True: one compile serves every shape (a static compile per shape costs ~10 s each).
        fn = torch.compile(swr_torch_fp32, dynamic=True)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(a, x, k, 16)

    back = None
    if bwd:
        a_l, x_l = a.clone().requires_grad_(), x.clone().requires_grad_()
        back = _grad_fn(fn(a_l, x_l, k, 16), [a_l, x_l])
    return Case(fwd, back, "fp32", "[B,H,16,L]", f"k={k}" + (", torch.compile(dynamic=True)" if compiled else ""))


def make_torch_fp32_compiled(batch: int, heads: int, length: int, *, bwd: bool = False) -> Case:
    return make_torch_fp32(batch, heads, length, compiled=True, bwd=bwd)


def make_accelerated_scan(batch: int, heads: int, length: int, *, bwd: bool = True) -> Case:
    try:
        from accelerated_scan.triton import scan  # older releases
    except ImportError:
        try:
            from accelerated_scan.scalar import scan  # 0.3: the Triton scan lives here
        except ImportError as err:
            raise Unavailable(f"accelerated_scan not importable ({err})") from None
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (batch, heads * HEAD_DIM, length)
    gates = (0.5 + 0.5 * torch.rand(shape, device=DEVICE, generator=g)).contiguous()
    tokens = torch.randn(shape, device=DEVICE, generator=g)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return scan(gates, tokens)

    back = None
    if bwd:
        g_l, t_l = gates.clone().requires_grad_(), tokens.clone().requires_grad_()
        back = _grad_fn(scan(g_l, t_l), [g_l, t_l])
    return Case(fwd, back, "fp32", "[B,H*16,L]", "full recurrence (per-channel gates)")


def make_hgrn(batch: int, heads: int, length: int, *, bwd: bool = True) -> Case:
    try:
        from fla.ops.hgrn import chunk_hgrn
    except Exception as err:  # ImportError, or fla failing on its own imports
        raise Unavailable(f"fla.ops.hgrn not importable ({type(err).__name__}: {err})") from None
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (batch, length, heads * HEAD_DIM)
    x = torch.randn(shape, device=DEVICE, generator=g).bfloat16()
    logg = torch.log(0.5 + 0.5 * torch.rand(shape, device=DEVICE, generator=g)).bfloat16()  # log-space gates

    def fwd() -> Any:
        with torch.no_grad():
            return chunk_hgrn(x, logg)

    back = None
    if bwd:
        x_l, g_l = x.clone().requires_grad_(), logg.clone().requires_grad_()
        out = chunk_hgrn(x_l, g_l)
        back = _grad_fn(out[0] if isinstance(out, tuple) else out, [x_l, g_l])
    return Case(fwd, back, "bf16", "[B,L,H*16]", "full recurrence, log gates")


def _attn_inputs(batch: int, heads: int, length: int, grad: bool) -> list[torch.Tensor]:
    width = heads * HEAD_DIM
    n_heads = max(1, width // ATTN_HEAD_DIM)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = [torch.randn(batch, n_heads, length, ATTN_HEAD_DIM, device=DEVICE, generator=g).bfloat16()
           for _ in range(3)]  # fmt: skip
    return [t.requires_grad_() for t in qkv] if grad else qkv


def make_flex_swa(batch: int, heads: int, length: int, *, window: int = SWA_WINDOW, bwd: bool = False) -> Case:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Unavailable(f"FlexAttention not in this torch ({err})") from None

    def swa(b, h, q_idx, kv_idx):  # FlexAttention's mask_mod signature
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    try:  # _compile=True builds the block mask without a dense L x L mask (L = 131072 would need 17 GB)
        mask = create_block_mask(swa, None, None, length, length, device=DEVICE, _compile=True)
    except TypeError:
        mask = create_block_mask(swa, None, None, length, length, device=DEVICE)
    _allow_repeated_compiled_backward()
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = _attn_inputs(batch, heads, length, grad=False)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return flex(q, k, v, block_mask=mask)

    back = None
    if bwd:
        ql, kl, vl = _attn_inputs(batch, heads, length, grad=True)
        back = _grad_fn(flex(ql, kl, vl, block_mask=mask), [ql, kl, vl])
    n_heads = q.shape[1]
    return Case(fwd, back, "bf16", f"[B,{n_heads},L,64]", f"window {window}, D={heads * HEAD_DIM}, {n_heads} heads")


def make_sdpa(batch: int, heads: int, length: int, *, bwd: bool = True) -> Case:
    q, k, v = _attn_inputs(batch, heads, length, grad=False)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    back = None
    if bwd:
        ql, kl, vl = _attn_inputs(batch, heads, length, grad=True)
        back = _grad_fn(F.scaled_dot_product_attention(ql, kl, vl, is_causal=True), [ql, kl, vl])
    n_heads = q.shape[1]
    return Case(fwd, back, "bf16", f"[B,{n_heads},L,64]", f"causal, D={heads * HEAD_DIM}, {n_heads} heads")


# name -> (maker, does a backward cheaply by default). Order = the order the suite runs them: cheap first,
# the ones that compile (seconds each) last so a time budget cuts those.
MAKERS: dict[str, tuple[Callable[..., Case], bool]] = {
    "sdpa_causal": (make_sdpa, True),
    "torch_fp32": (make_torch_fp32, True),
    "accelerated_scan": (make_accelerated_scan, True),
    "hgrn": (make_hgrn, True),
    "flex_swa512": (make_flex_swa, False),
    "torch_fp32_compile": (make_torch_fp32_compiled, False),
}


# ------------------------------------------------------------------ the attention layer


class Attention(nn.Module):
    """``Linear(D, 3D)`` -> causal attention, head dim 64 -> ``Linear(D, D)``: SDPA over the whole prefix
    (``window=None``) or FlexAttention over the last ``window`` tokens (its block mask built for ``length``)."""

    def __init__(self, dim: int, window: int | None, length: int) -> None:
        super().__init__()
        self.heads = dim // ATTN_HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.window = window
        if window is not None:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def swa(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

            self.mask = create_block_mask(swa, None, None, length, length, device="cuda")
            self.flex = torch.compile(flex_attention, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, ATTN_HEAD_DIM).permute(2, 0, 3, 1, 4)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = self.flex(q, k, v, block_mask=self.mask)
        return self.out(o.transpose(1, 2).reshape(b, length, dim))
