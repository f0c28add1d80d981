"""A small hybrid LM for distributed tests and benchmarks: Phalanx in the local slots, causal attention in
the global ones (the block structure of ``bench/models/hybrid.py``, scaled down and importable anywhere).

    model = HybridLM(HybridConfig(dim=64, layers=4))
    logits = model(tokens)                                     # one process, [B, L] -> [B, L, vocab]
    logits = model(tokens[:, s:e], cp_group=group)             # context parallel: this rank's slice
    loss = lm_loss(logits, labels[:, s:e], total=B * L)        # sum / global token count

With ``cp_group`` (a ProcessGroup or a CPContext) the Phalanx layers exchange their SWR states across the
rank edges and the attention layers attend over the whole sequence: ``attention="gather"`` all-gathers K
and V (any backend), ``attention="torch"`` leaves SDPA to torch's ``context_parallel`` (CUDA; see
:mod:`swrgen.distributed.attention`). The model has no positional embedding: the recurrence orders tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swrgen.distributed.attention import causal_attention
from swrgen.distributed.context_parallel import CPContext, cp_context
from swrgen.nn import Phalanx

__all__ = ["HybridConfig", "HybridLM", "lm_loss"]


@dataclass(frozen=True)
class HybridConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 4
    global_every: int = 2  # block i is global attention when i % global_every == global_every - 1
    attn_heads: int = 4
    head_dim: int = 16  # Phalanx head_dim
    kv_heads: int | None = None
    window_blocks: int = 2
    block_len: int = 16
    mlp_mult: int = 4
    fused: bool | None = None  # Phalanx: None = the fused kernels on CUDA


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of attn_heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cp: CPContext | None = None, attention: str = "gather") -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = causal_attention(q, k, v, cp, attention)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, dim: int, mlp_mult: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_mult * dim, bias=False), nn.GELU(),
                                 nn.Linear(mlp_mult * dim, dim, bias=False))  # fmt: skip

    def forward(self, x: torch.Tensor, cp: CPContext | None, attention: str) -> torch.Tensor:
        h = self.norm1(x)
        if isinstance(self.mixer, Phalanx):
            h = self.mixer(h, cp_group=cp)
        else:
            h = self.mixer(h, cp, attention)
        x = x + h
        return x + self.mlp(self.norm2(x))


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig = HybridConfig()) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab, c.dim)
        blocks = []
        for i in range(c.layers):
            if i % c.global_every == c.global_every - 1:
                mixer: nn.Module = CausalSelfAttention(c.dim, c.attn_heads)
            else:
                mixer = Phalanx(c.dim, head_dim=c.head_dim, kv_heads=c.kv_heads, window_blocks=c.window_blocks,
                                block_len=c.block_len, fused=c.fused)  # fmt: skip
            blocks.append(Block(mixer, c.dim, c.mlp_mult))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, cp_group=None, attention: str = "gather") -> torch.Tensor:
        """``tokens`` [B, L] (this rank's slice with ``cp_group``) -> logits [B, L, vocab]."""
        cp = None
        if cp_group is not None:  # one all-gather of the slice lengths for every layer of the step
            cp = cp_group if isinstance(cp_group, CPContext) else cp_context(cp_group, tokens.shape[1])
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cp, attention)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, total: int) -> torch.Tensor:
    """Cross-entropy summed over this rank's tokens and divided by the global token count ``total``: the
    ranks' losses (and gradients) add up to the mean over the whole batch."""
    flat = logits.flatten(0, 1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    return F.cross_entropy(flat, labels.flatten(), reduction="sum") / total
