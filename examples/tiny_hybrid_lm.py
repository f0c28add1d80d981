"""A tiny hybrid language model: Phalanx layers (swrgen SWR) alternating with causal attention.

    python examples/tiny_hybrid_lm.py                 # CPU config: a few hundred steps, well under a minute
    python examples/tiny_hybrid_lm.py --device cuda   # GPU config: wider, longer context, bf16 autocast

Character-level model on a deterministic synthetic text (a small seeded grammar, generated here). It
prints the loss on a fixed held-out batch before and after training (it must fall), then greedily
generates tokens twice from the same prompt:

* with decode state: one prefill of the prompt, then one token at a time (Phalanx layers carry an
  ``SwrState`` through ``Phalanx.step``; attention layers keep a KV cache);
* by re-running the full forward over the whole growing sequence for every new token;

and checks that both produce the same tokens. The model has no positional embedding: the recurrence in
the Phalanx layers gives the attention layers their sense of order.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swrgen.nn import Phalanx

# ---------------------------------------------------------------- data


def make_text(n_chars: int = 12000, seed: int = 1234) -> str:
    """Deterministic English-like text from a tiny grammar (same string on every machine)."""
    rng = random.Random(seed)
    subjects = [
        "the cat",
        "a dog",
        "the old man",
        "my sister",
        "the small bird",
        "a child",
        "the farmer",
        "our teacher",
    ]
    verbs = ["sat on", "ran to", "looked at", "jumped over", "walked past", "slept under", "painted", "found"]
    objects = ["the mat", "the park", "a tall tree", "the river", "the red house", "a wooden box", "the hill"]
    times = ["today", "at noon", "in the morning", "after dinner", "every day", "last night"]
    parts = []
    while sum(map(len, parts)) < n_chars:
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(times)}"
        if rng.random() < 0.3:
            s += f" and then {rng.choice(verbs)} {rng.choice(objects)}"
        parts.append(s[0].upper() + s[1:] + ". ")
    return "".join(parts)[:n_chars]


# ---------------------------------------------------------------- model


class CausalAttention(nn.Module):
    """Multi-head causal self-attention (torch SDPA) with a KV cache for decoding."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, heads, L, hd]

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, L, self.heads * self.hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = self._qkv(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)), (k, v)

    def step(self, x_t: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]):
        q, k, v = self._qkv(x_t[:, None])
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        return self._merge(F.scaled_dot_product_attention(q, k, v))[:, 0], (k, v)  # the new token sees all


class Block(nn.Module):
    """Pre-norm residual block: mixer (Phalanx or attention) then an MLP."""

    def __init__(self, dim: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def prefill(self, x: torch.Tensor):
        if isinstance(self.mixer, Phalanx):
            h, cache = self.mixer(self.norm1(x), return_state=True)
        else:
            h, cache = self.mixer.prefill(self.norm1(x))
        x = x + h
        return x + self.mlp(self.norm2(x)), cache

    def step(self, x_t: torch.Tensor, cache):
        h, cache = self.mixer.step(self.norm1(x_t), cache)
        x_t = x_t + h
        return x_t + self.mlp(self.norm2(x_t)), cache


@dataclass
class Config:
    vocab: int
    dim: int = 64
    layers: int = 4  # alternating Phalanx, attention, Phalanx, attention, ...
    head_dim: int = 16
    kv_heads: int | None = None
    attn_heads: int = 4
    window_blocks: int = 2
    block_len: int = 16


class TinyHybridLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.dim)
        blocks = []
        for i in range(cfg.layers):
            if i % 2 == 0:
                mixer = Phalanx(cfg.dim, head_dim=cfg.head_dim, kv_heads=cfg.kv_heads,
                                window_blocks=cfg.window_blocks, block_len=cfg.block_len)  # fmt: skip
            else:
                mixer = CausalAttention(cfg.dim, cfg.attn_heads)
            blocks.append(Block(cfg.dim, mixer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.emb.weight.t()  # tied output head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for blk in self.blocks:
            h = blk(h)
        return self._head(h)

    def prefill(self, idx: torch.Tensor):
        """Logits of the last position and one cache per block (SwrState or (K, V))."""
        h, caches = self.emb(idx), []
        for blk in self.blocks:
            h, c = blk.prefill(h)
            caches.append(c)
        return self._head(h[:, -1]), caches

    def step(self, tok: torch.Tensor, caches: list):
        h = self.emb(tok)
        new = []
        for blk, c in zip(self.blocks, caches, strict=True):
            h, c = blk.step(h, c)
            new.append(c)
        return self._head(h), new


# ---------------------------------------------------------------- training and generation


CONFIGS = {
    "cpu": dict(dim=64, layers=4, attn_heads=4, seq=64, batch=16, steps=200, lr=3e-3, gen=48, text=12_000),
    "cuda": dict(dim=256, layers=6, attn_heads=8, seq=512, batch=32, steps=400, lr=2e-3, gen=128, text=400_000),
}


@torch.no_grad()
def generate_with_state(model: TinyHybridLM, prompt: torch.Tensor, n: int) -> list[int]:
    logits, caches = model.prefill(prompt)
    out = []
    for _ in range(n):
        tok = logits.argmax(-1)
        out.append(int(tok[0]))
        logits, caches = model.step(tok, caches)
    return out


@torch.no_grad()
def generate_full(model: TinyHybridLM, prompt: torch.Tensor, n: int) -> list[int]:
    seq, out = prompt, []
    for _ in range(n):
        tok = model(seq)[:, -1].argmax(-1)
        out.append(int(tok[0]))
        seq = torch.cat([seq, tok[:, None]], dim=1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--gen", type=int, default=None, help="tokens to generate (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    hp = dict(CONFIGS[args.device])
    steps = hp["steps"] if args.steps is None else args.steps
    n_gen = hp["gen"] if args.gen is None else args.gen
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    text = make_text(hp["text"])
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(data))
    train, val = data[:n_train], data[n_train:]
    cfg = Config(vocab=len(chars), dim=hp["dim"], layers=hp["layers"], attn_heads=hp["attn_heads"])
    model = TinyHybridLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.01)
    seq, batch = hp["seq"], hp["batch"]
    gen = torch.Generator().manual_seed(args.seed)

    def get_batch(src: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, len(src) - seq - 1, (batch,), generator=g)
        xb = torch.stack([src[i : i + seq] for i in ix])
        yb = torch.stack([src[i + 1 : i + seq + 1] for i in ix])
        return xb.to(device), yb.to(device)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    val_batch = get_batch(val, torch.Generator().manual_seed(99))

    @torch.no_grad()
    def val_loss() -> float:
        with autocast:
            logits = model(val_batch[0])
        return F.cross_entropy(logits.float().reshape(-1, cfg.vocab), val_batch[1].reshape(-1)).item()

    print(
        f"tiny hybrid LM on {device}: {n_params / 1e3:.1f}k params, vocab {cfg.vocab}, {cfg.layers} layers "
        f"(Phalanx k={cfg.window_blocks} BL={cfg.block_len} / causal attention), seq {seq}, batch {batch}"
    )
    loss_start = val_loss()
    print(f"step 0: val loss {loss_start:.4f}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        xb, yb = get_batch(train, gen)
        with autocast:
            logits = model(xb)
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step}: train loss {loss.item():.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    loss_end = val_loss()
    tok_s = steps * batch * seq / train_s
    print(f"step {steps}: val loss {loss_end:.4f} (start {loss_start:.4f}); {train_s:.1f} s, {tok_s:,.0f} tokens/s")

    # Generation, in fp32 (no autocast): decode state vs re-running the full forward.
    model.eval()
    prompt = data[n_train : n_train + 24][None].to(device)  # held-out text
    t0 = time.perf_counter()
    toks_state = generate_with_state(model, prompt, n_gen)
    t_state = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks_full = generate_full(model, prompt, n_gen)
    t_full = time.perf_counter() - t0
    decode = "".join(chars[i] for i in prompt[0].tolist())
    print(f"prompt:     {decode!r}")
    print(f"with state: {''.join(chars[i] for i in toks_state)!r}  ({t_state:.2f} s)")
    print(f"full:       {''.join(chars[i] for i in toks_full)!r}  ({t_full:.2f} s)")
    same = toks_state == toks_full
    print(f"generation with decode state == full forward: {same} ({n_gen} tokens)")
    result = dict(loss_start=loss_start, loss_end=loss_end, tokens_state=toks_state, tokens_full=toks_full,
                  train_s=train_s, tokens_per_s=tok_s, params=n_params)  # fmt: skip
    if not loss_end < loss_start:
        raise SystemExit(f"FAIL: the loss did not fall ({loss_start:.4f} -> {loss_end:.4f})")
    if not same:
        first = next(i for i, (a, b) in enumerate(zip(toks_state, toks_full, strict=True)) if a != b)
        raise SystemExit(f"FAIL: generation with decode state differs from the full forward at token {first}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
