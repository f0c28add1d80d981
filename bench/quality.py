"""Quality at equal tokens: a Phalanx hybrid vs a sliding-window-attention hybrid vs an all-causal Transformer.

    python bench/quality.py --smoke                        # CPU, tiny: all three models, seconds
    python bench/quality.py --data-report                  # only collect the text and print its statistics
    python bench/quality.py --model phalanx --out ph.json  # one model a call on the GPU
    python bench/quality.py --model swa --out swa.json
    python bench/quality.py --model causal --out causal.json
    python bench/quality.py --merge ph.json swa.json causal.json --out all.json --plot curves.png

Three byte-level language models of one shape are trained on the same tokens in the same order with the same
optimizer and schedule; they differ only in the mixer of the *local* slots:

* ``phalanx_k{k}``: ``swrgen.nn.Phalanx`` (head dim 16, ``--window-blocks`` k, default 2; an ablation can
  pass several k);
* ``swa``: sliding-window causal attention, window 512 (CUDA: FlexAttention with a sliding-window block mask,
  ``torch.compile``d; CPU: SDPA with a boolean mask);
* ``causal``: causal attention there too (a plain Transformer).

Every ``--global-every``-th block is causal attention (SDPA, RoPE) in all three. Blocks are pre-norm (RMSNorm,
mixer, RMSNorm, SwiGLU MLP), the embedding is tied to the output head, vocab 256 (bytes).

Data: real text that the installed software ships: the ``*.py``/``*.md``/``*.rst``/``*.txt`` files of the Python
standard library and of a fixed list of site-packages (missing packages are skipped and recorded). Files are
listed in sorted order; a size cap keeps a stable hash-chosen subset; validation takes whole files (the lowest
hash values, until ``--val-fraction`` of the bytes), so no validation file is ever trained on. The JSON records
the roots, package versions, file lists, byte counts, the rules and a digest of the token streams.

Reported: validation loss / bits per byte / perplexity on a fixed validation sample at regular token intervals,
training tokens/s (after warm-up, compile and evaluation excluded, CUDA-synchronised), wall time, parameters,
and Phalanx vs SWA: final validation loss (target: within +1%) and training throughput (target: >= +10%).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swrgen.nn import Phalanx

SCHEMA = "swrgen-quality/1"
VOCAB = 256  # bytes, no merges
SEPARATOR = 0  # the byte between two files (files holding a NUL byte are skipped, so 0 only marks boundaries)

# The packages whose shipped text is read (in this order, after the standard library). Absent ones are skipped.
DEFAULT_PACKAGES = ("torch", "numpy", "scipy", "pandas", "matplotlib", "transformers", "jax", "sympy",
                    "networkx", "triton", "jinja2", "yaml", "click", "setuptools", "pip")  # fmt: skip
SUFFIXES = (".py", ".md", ".rst", ".txt")
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})  # keeps packages out of the stdlib root

# Defaults per preset; any option given on the command line overrides them.
PRESETS: dict[str, dict[str, object]] = {
    # ~39M parameters, 64 Mi tokens of 4096-token sequences, 64 Ki tokens a step (1024 steps).
    "full": {
        "dim": 512, "blocks": 12, "global_every": 3, "attn_head_dim": 64, "mlp_hidden": 1408,
        "context": 4096, "window": 512, "batch": 16, "tokens": 2**26, "lr": 1.5e-3,
        "eval_every": 2**22, "val_tokens": 2**20, "warmup_steps": 10,
        "packages": list(DEFAULT_PACKAGES), "stdlib": True, "max_bytes": 256 * 2**20,
        "max_file_bytes": 2**20, "val_fraction": 0.02,
    },
    # CPU seconds: 8 steps of 4 x 256 tokens on a few hundred KB of the standard library.
    "smoke": {
        "dim": 64, "blocks": 3, "global_every": 3, "attn_head_dim": 32, "mlp_hidden": 192,
        "context": 256, "window": 64, "batch": 4, "tokens": 8 * 4 * 256, "lr": 3e-3,
        "eval_every": 2 * 4 * 256, "val_tokens": 4 * 256, "warmup_steps": 2,
        "packages": [], "stdlib": True, "max_bytes": 400_000,
        "max_file_bytes": 2**20, "val_fraction": 0.02,
    },
}  # fmt: skip

# Fixed optimisation settings (recorded in the JSON's config).
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LR_WARMUP_FRACTION = 0.05
LR_MIN_RATIO = 0.1
LOSS_TARGET = 0.01  # Phalanx's final validation loss at most 1% above SWA's
THROUGHPUT_TARGET = 0.10  # and its training throughput at least 10% above

DATA_RULES = {
    "files": f"regular files (no symlinks) ending in {', '.join(SUFFIXES)} under each root; directories "
             f"{', '.join(sorted(SKIP_DIRS))} and names starting with '.' are not entered; empty files and files "
             "over max_file_bytes are skipped; paths are sorted; a file reached through two roots counts once "
             "(the first root)",
    "text": "files that cannot be read, are not valid UTF-8 or hold a NUL byte are skipped",
    "cap": "if the listed files exceed max_bytes, they are taken in order of sha256('select:' + key) while "
           "they fit (a stable, uniform subset); key = '<root label>/<relative posix path>'",
    "split": "validation = whole files, in order of sha256('val:' + key), until they hold >= val_fraction of "
             "the bytes; every other file is training",
    "stream": f"each split is its files in sorted key order, each followed by byte {SEPARATOR}; tokens = bytes",
    "train_order": "non-overlapping windows of context+1 tokens at offsets multiple of context, in a seeded "
                   "permutation per epoch (torch.Generator(seed).randperm), batch after batch",
    "val_sample": "n windows of context+1 tokens at evenly spaced offsets of the validation stream, n = "
                  "val_tokens / context rounded up to a multiple of batch",
}  # fmt: skip


# ================================================================ data


@dataclass(frozen=True)
class Root:
    """A directory (or a single module file) whose text files are read."""

    label: str  # 'stdlib' or the package's import name
    path: Path
    version: str | None


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 [N] byte stream
    val: torch.Tensor  # uint8 [M]
    report: dict


@cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _version(name: str) -> str | None:
    dists = _distributions().get(name, [])
    for dist in dists:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def find_roots(packages: list[str], stdlib: bool) -> tuple[list[Root], list[str]]:
    """The stdlib (optional) and each package's location, found without importing it; (roots, missing names)."""
    roots: list[Root] = []
    if stdlib:
        roots.append(Root("stdlib", Path(sysconfig.get_paths()["stdlib"]), f"Python {platform.python_version()}"))
    missing: list[str] = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            missing.append(name)
            continue
        paths = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
        paths = [p for p in paths if p and os.path.exists(p)]
        if not paths:
            missing.append(name)
            continue
        roots += [Root(name, Path(p), _version(name)) for p in sorted(paths)]
    return roots, missing


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        if root.name.lower().endswith(SUFFIXES):  # a single-module package (not a compiled extension)
            yield root
        return
    for here, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                yield Path(here) / name


def _hash(salt: str, key: str) -> bytes:
    return hashlib.sha256(f"{salt}:{key}".encode()).digest()


def collect_corpus(roots: list[Root], max_bytes: int, max_file_bytes: int, val_fraction: float) -> Corpus:
    """List, cap, read, filter and split the files of ``roots`` (rules: ``DATA_RULES``)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    reasons = ("empty", "too_large", "symlink", "duplicate", "unreadable", "not_utf8_or_nul", "over_cap")
    skipped = dict.fromkeys(reasons, 0)  # files left out, per reason
    listed: list[tuple[str, Path, int]] = []  # (key, path, size)
    seen: set[str] = set()
    for root in roots:
        base = root.path if root.path.is_dir() else root.path.parent
        for path in _walk(root.path):
            if path.is_symlink():
                skipped["symlink"] += 1
                continue
            size = path.stat().st_size
            if size == 0 or size > max_file_bytes:
                skipped["empty" if size == 0 else "too_large"] += 1
                continue
            real = os.path.realpath(path)
            if real in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(real)
            listed.append((f"{root.label}/{path.relative_to(base).as_posix()}", path, size))
    listed_bytes = sum(size for _, _, size in listed)
    if listed_bytes > max_bytes:  # a stable uniform subset: hash order, every file that still fits
        chosen, total = [], 0
        for item in sorted(listed, key=lambda item: _hash("select", item[0])):
            if total + item[2] <= max_bytes:
                chosen.append(item)
                total += item[2]
        skipped["over_cap"] = len(listed) - len(chosen)
        listed = chosen
    texts: dict[str, bytes] = {}
    for key, path, _ in sorted(listed):
        try:
            raw = path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = b"\0"  # counted with the NUL files below
        if b"\0" in raw:
            skipped["not_utf8_or_nul"] += 1
            continue
        texts[key] = raw
    if len(texts) < 2:
        raise ValueError(f"found {len(texts)} usable text files under {[str(r.path) for r in roots]}; need >= 2 "
                         "(one for validation, one for training): add packages or raise --max-bytes")  # fmt: skip
    total = sum(map(len, texts.values()))
    val_keys: set[str] = set()
    val_bytes = 0
    for key in sorted(texts, key=lambda k: _hash("val", k)):
        if val_bytes >= val_fraction * total:
            break
        val_keys.add(key)
        val_bytes += len(texts[key])
    if len(val_keys) == len(texts):
        raise ValueError(f"val_fraction={val_fraction} leaves no training file among {len(texts)}; lower it")
    splits = {"train": sorted(k for k in texts if k not in val_keys), "val": sorted(val_keys)}
    streams = {name: _stream([texts[k] for k in keys]) for name, keys in splits.items()}
    digest = hashlib.sha256()
    for name in ("train", "val"):
        digest.update(name.encode() + streams[name].numpy().tobytes())
    per_root = []
    for root in roots:
        keys = [k for k in texts if k.split("/", 1)[0] == root.label]
        tr = [k for k in keys if k not in val_keys]
        vl = [k for k in keys if k in val_keys]
        per_root.append({"label": root.label, "path": str(root.path), "version": root.version, "files": len(keys),
                         "bytes": sum(len(texts[k]) for k in keys), "train_files": len(tr),
                         "train_bytes": sum(len(texts[k]) for k in tr), "val_files": len(vl),
                         "val_bytes": sum(len(texts[k]) for k in vl)})  # fmt: skip
    report = {
        "roots": _merge_root_rows(per_root),
        "options": {"max_bytes": max_bytes, "max_file_bytes": max_file_bytes, "val_fraction": val_fraction},
        "rules": DATA_RULES,
        "listed_bytes": listed_bytes,
        "skipped_files": skipped,
        "train_files": len(splits["train"]),
        "train_bytes": sum(len(texts[k]) for k in splits["train"]),
        "val_files": len(splits["val"]),
        "val_bytes": val_bytes,
        "train_tokens": int(streams["train"].numel()),  # bytes + one separator per file
        "val_tokens": int(streams["val"].numel()),
        "sha256": digest.hexdigest(),
        "files": splits,
    }
    return Corpus(streams["train"], streams["val"], report)


def _merge_root_rows(rows: list[dict]) -> list[dict]:
    """One row per label (a namespace package may have several directories)."""
    merged: dict[str, dict] = {}
    for row in rows:
        if row["label"] not in merged:
            merged[row["label"]] = dict(row, path=[row["path"]])
            continue
        into = merged[row["label"]]
        into["path"].append(row["path"])
        for field in ("files", "bytes", "train_files", "train_bytes", "val_files", "val_bytes"):
            into[field] += row[field]
    return list(merged.values())


def _stream(texts: list[bytes]) -> torch.Tensor:
    sep = bytes([SEPARATOR])
    data = bytearray(b"".join(t + sep for t in texts))
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(cfg: dict) -> Corpus:
    roots, missing = find_roots(cfg["packages"], cfg["stdlib"])
    if not roots:
        raise ValueError("no text roots: the standard library is off and none of the packages is installed")
    corpus = collect_corpus(roots, cfg["max_bytes"], cfg["max_file_bytes"], cfg["val_fraction"])
    corpus.report["packages_requested"] = list(cfg["packages"])
    corpus.report["packages_missing"] = missing
    corpus.report["stdlib"] = cfg["stdlib"]
    return corpus


def train_schedule(n_tokens: int, context: int, batch: int, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """Start offsets ``[steps, batch]`` of the training windows (``DATA_RULES['train_order']``), and the epochs."""
    chunks = (n_tokens - 1) // context
    if chunks < batch:
        raise ValueError(f"the training stream holds {chunks} windows of {context + 1} tokens; a batch needs "
                         f"{batch}: raise --max-bytes or lower --context/--batch")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch
    order = torch.cat([torch.randperm(chunks, generator=gen) for _ in range(-(-need // chunks))])[:need]
    return (order * context).view(steps, batch), need / chunks


def val_sample(val: torch.Tensor, context: int, val_tokens: int, batch: int) -> torch.Tensor:
    """The fixed validation windows ``[n, context + 1]`` (``DATA_RULES['val_sample']``)."""
    if val.numel() < context + 1:
        raise ValueError(f"the validation stream holds {val.numel()} tokens, fewer than one window of "
                         f"{context + 1}: raise --val-fraction or --max-bytes")  # fmt: skip
    n = -(-max(1, -(-val_tokens // context)) // batch) * batch
    starts = torch.linspace(0, val.numel() - context - 1, n).round().long()
    return val[starts[:, None] + torch.arange(context + 1)]


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


# ================================================================ model


@cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # the fused kernel needs compile (FlexAttention docs)


def swa_mask_mod(window: int) -> Callable:
    """FlexAttention mask_mod of sliding-window causal attention: query q sees keys q-window+1 .. q."""

    def swa(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (q >= kv) & (q - kv < window)

    return swa


def window_mask(window: int, context: int, device: torch.device, impl: str = "auto") -> object:
    """The SWA mask for ``context`` tokens: a FlexAttention BlockMask (impl 'flex'; 'auto' on CUDA), or a
    boolean ``[L, L]`` SDPA mask, True = attend (impl 'sdpa'; 'auto' elsewhere)."""
    if impl == "flex" or (impl == "auto" and device.type == "cuda"):
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(swa_mask_mod(window), None, None, context, context, device=device)
    if impl not in ("auto", "sdpa"):
        raise ValueError(f"SWA implementation must be auto, flex or sdpa; got {impl!r}")
    pos = torch.arange(context, device=device)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff < window)


class Rotary(nn.Module):
    """Rotary position embedding (half-split convention), tables for ``context`` positions."""

    def __init__(self, head_dim: int, context: int, base: float = 10000.0) -> None:
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(context, dtype=torch.float32), inv)  # [L, head_dim / 2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, L, hd]
        length = x.shape[-2]
        cos, sin = self.cos[:length], self.sin[:length]
        x1, x2 = x.float().chunk(2, dim=-1)  # rotate in fp32, return x's dtype (bf16 under autocast)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE; ``mask`` None = full causal (SDPA), else a :func:`window_mask`."""

    def __init__(self, dim: int, head_dim: int, rope: Rotary, mask: object = None) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim={dim} must be a multiple of the attention head dim {head_dim}")
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.rope = rope
        self.mask = mask  # shared by the layers; not a buffer (the model is built on its device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q), self.rope(k)
        if self.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(self.mask, torch.Tensor):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:length, :length])
        else:
            mask_len = getattr(self.mask, "seq_lengths", (length,))[0]
            if length != mask_len:
                raise ValueError(f"the SWA block mask is for {mask_len} tokens; got {length}")
            # q, k, v are already bf16 under autocast; flex runs outside it (mixed-dtype inputs break its backward)
            with torch.autocast(x.device.type, enabled=False):
                o = _compiled_flex()(q, k, v, block_mask=self.mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mixer, self.mlp = mixer, SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def slots(blocks: int, global_every: int) -> list[str]:
    """'global' or 'local' per block: every ``global_every``-th block (1-based) is a global slot."""
    return ["global" if i % global_every == global_every - 1 else "local" for i in range(blocks)]


class HybridLM(nn.Module):
    """Byte-level LM: embedding, pre-norm blocks (mixers from :func:`layout`), RMSNorm, tied output head."""

    def __init__(self, cfg: dict, local: str, window_blocks: int, device: torch.device) -> None:
        super().__init__()
        dim, context = cfg["dim"], cfg["context"]
        self.slots = slots(cfg["blocks"], cfg["global_every"])
        self.kinds = ["causal" if slot == "global" else local for slot in self.slots]  # mixer per block
        with torch.device(device):
            self.embed = nn.Embedding(VOCAB, dim)
            rope = Rotary(cfg["attn_head_dim"], context)
            swa_mask = window_mask(cfg["window"], context, device, cfg["swa_impl"]) if "swa" in self.kinds else None
            blocks = []
            for kind in self.kinds:
                if kind == "phalanx":
                    mixer: nn.Module = Phalanx(dim, head_dim=cfg["phalanx_head_dim"], kv_heads=cfg["kv_heads"],
                                               window_blocks=window_blocks, block_len=cfg["block_len"],
                                               decay_max=cfg["decay_max"])  # fmt: skip
                else:
                    mixer = Attention(dim, cfg["attn_head_dim"], rope, swa_mask if kind == "swa" else None)
                blocks.append(Block(dim, cfg["mlp_hidden"], mixer))
            self.blocks = nn.ModuleList(blocks)
            self.norm = nn.RMSNorm(dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) for every matrix (embedding included), the residual outputs scaled by 1/sqrt(2 * blocks)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("out_proj.weight", "down.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * len(self.blocks)) if residual else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    def param_counts(self) -> dict[str, int]:
        def mixers(slot: str) -> int:
            blocks = [b for b, s in zip(self.blocks, self.slots, strict=True) if s == slot]
            return sum(p.numel() for b in blocks for p in b.mixer.parameters())

        return {"total": sum(p.numel() for p in self.parameters()), "embedding": self.embed.weight.numel(),
                "local_mixers": mixers("local"), "global_mixers": mixers("global")}  # fmt: skip


def model_name(local: str, window_blocks: int) -> str:
    return f"phalanx_k{window_blocks}" if local == "phalanx" else local


# ================================================================ train / eval


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over LR_WARMUP_FRACTION of the steps, then cosine to LR_MIN_RATIO * lr."""
    warm = max(1, round(LR_WARMUP_FRACTION * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (LR_MIN_RATIO + (1 - LR_MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * t)))


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(device: torch.device) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _loss(model: nn.Module, seq: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(seq[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, sample: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-byte loss (nats) over the validation sample."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, sample.shape[0], batch):
        with _autocast(device):
            total += _loss(model, sample[i : i + batch], reduction="sum").double()
    return total.item() / (sample.shape[0] * (sample.shape[1] - 1))


def _point(step: int, tokens: int, val_loss: float, train_loss: float | None, train_s: float) -> dict:
    finite = math.isfinite(val_loss)
    return {"step": step, "tokens": tokens, "val_loss": val_loss, "val_bpb": val_loss / math.log(2),
            "val_ppl": math.exp(val_loss) if finite and val_loss < 700 else float("inf"),
            "train_loss": train_loss, "train_s": train_s}  # fmt: skip


def train_model(cfg: dict, local: str, window_blocks: int, seed: int, corpus: Corpus, device: torch.device,
                on_eval: Callable[[dict], None]) -> dict:  # fmt: skip
    """Train one model on ``cfg['steps']`` steps; returns its run record (``on_eval`` sees it after each eval)."""
    wall_start = time.perf_counter()
    batch, context, steps = cfg["batch"], cfg["context"], cfg["steps"]
    step_tokens = batch * context
    schedule, epochs = train_schedule(corpus.train.numel(), context, batch, steps, seed)
    sample = val_sample(corpus.val, context, cfg["val_tokens"], batch)
    train_stream = corpus.train.to(device)
    starts = schedule.to(device)  # all of it at once: no host-to-device copy inside the timed loop
    window = torch.arange(context + 1, device=device)

    torch.manual_seed(seed)
    model = HybridLM(cfg, local, window_blocks, device)
    params = model.param_counts()
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]  # norms: no decay
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=BETAS, fused=device.type == "cuda")
    runner: nn.Module = torch.compile(model) if cfg["compile"] else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = {
        "model": model_name(local, window_blocks), "local": local, "seed": seed,
        "window_blocks": window_blocks if local == "phalanx" else None, "layout": model.kinds, "params": params,
        "steps": steps, "tokens_trained": 0, "epochs": epochs, "data_order_sha256": _sha256(schedule),
        "val_sample_sha256": _sha256(sample), "val_sample_windows": sample.shape[0], "curve": [],
        "complete": False, "finite": True, "env": environment(device),
    }  # fmt: skip
    sample = sample.to(device).long()
    name = run["model"]
    timed_s, timed_steps, eval_s = 0.0, 0, 0.0
    loss_sum = torch.zeros((), device=device)
    since_eval = 0

    def do_eval(step: int) -> None:
        nonlocal eval_s, since_eval
        start = _clock(device)
        val_loss = evaluate(runner, sample, batch, device)
        train_loss = (loss_sum.item() / since_eval) if since_eval else None
        eval_s += _clock(device) - start
        loss_sum.zero_()
        since_eval = 0
        run["curve"].append(_point(step, step * step_tokens, val_loss, train_loss, timed_s))
        run["finite"] = run["finite"] and math.isfinite(val_loss) and (train_loss is None or math.isfinite(train_loss))
        run.update(tokens_trained=step * step_tokens, final=run["curve"][-1], timed_steps=timed_steps,
                   timed_tokens=timed_steps * step_tokens, timed_s=timed_s,
                   train_tokens_per_s=timed_steps * step_tokens / timed_s if timed_s > 0 else None,
                   eval_s=eval_s, wall_s=time.perf_counter() - wall_start)  # fmt: skip
        tps = run["train_tokens_per_s"]
        speed = f"{tps / 1e3:8.1f}k tok/s, ~{(steps - step) * step_tokens / tps:5.0f} s to go" if tps else "(warm-up)"
        print(f"  {name:12s} step {step:6d}/{steps}  tokens {step * step_tokens:>11,d}  val {val_loss:.4f} "
              f"({val_loss / math.log(2):.3f} bpb)  train {'-' if train_loss is None else f'{train_loss:.4f}'}  "
              f"{speed}  {run['wall_s']:7.1f} s", flush=True)  # fmt: skip
        on_eval(run)

    do_eval(0)
    timer = None  # start of the current timed segment (None during warm-up)
    for step in range(steps):
        if step == cfg["warmup_steps"]:
            timer = _clock(device)  # compile, kernel builds and the allocator's first growth are behind us
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg["lr"])
        seq = train_stream[starts[step][:, None] + window].long()
        with _autocast(device):
            loss = _loss(runner, seq)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        since_eval += 1
        if timer is not None:
            timed_steps += 1
        done = step + 1
        if done % cfg["eval_every_steps"] == 0 or done == steps:
            if timer is not None:
                timed_s += _clock(device) - timer
            do_eval(done)
            if not run["finite"]:
                print(f"  {name}: non-finite loss at step {done}; stopping this model", flush=True)
                break
            timer = _clock(device) if done >= cfg["warmup_steps"] else None
    run["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    run["wall_s"] = time.perf_counter() - wall_start
    run["complete"] = run["finite"] and run["tokens_trained"] == steps * step_tokens
    return run


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "cuda": torch.version.cuda, "host": platform.node()}  # fmt: skip
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    env["git_commit"] = commit or None
    return env


# ================================================================ report


def _at_common_tokens(a: dict, b: dict) -> tuple[int, float, float] | None:
    """(tokens, loss a, loss b) at the largest token count both curves evaluated."""
    la = {p["tokens"]: p["val_loss"] for p in a["curve"]}
    lb = {p["tokens"]: p["val_loss"] for p in b["curve"]}
    common = sorted(set(la) & set(lb))
    return (common[-1], la[common[-1]], lb[common[-1]]) if common else None


def compare(runs: list[dict]) -> dict:
    """Each Phalanx run vs SWA (and causal) of the same seed; then the mean over seeds."""
    rows = []
    for ph in (r for r in runs if r["local"] == "phalanx"):
        row: dict = {"model": ph["model"], "seed": ph["seed"]}
        for ref_name in ("swa", "causal"):
            ref = next((r for r in runs if r["model"] == ref_name and r["seed"] == ph["seed"]), None)
            if ref is None:
                continue
            at = _at_common_tokens(ph, ref)
            if at is None:
                continue
            tokens, loss_ph, loss_ref = at
            tps_ph, tps_ref = ph.get("train_tokens_per_s"), ref.get("train_tokens_per_s")
            row[f"vs_{ref_name}"] = {
                "at_tokens": tokens,
                "both_complete": bool(ph["complete"] and ref["complete"]),
                "val_loss": loss_ph, f"{ref_name}_val_loss": loss_ref,
                "loss_rel": loss_ph / loss_ref - 1,
                "throughput_rel": tps_ph / tps_ref - 1 if tps_ph and tps_ref else None,
                "same_device": ph["env"]["device_name"] == ref["env"]["device_name"],
            }  # fmt: skip
        if "vs_swa" in row:
            vs = row["vs_swa"]
            vs["loss_target_met"] = vs["loss_rel"] <= LOSS_TARGET
            vs["throughput_target_met"] = vs["throughput_rel"] is not None and vs["throughput_rel"] >= THROUGHPUT_TARGET
        rows.append(row)
    mean = {}
    for name in sorted({r["model"] for r in rows}):
        vs = [r["vs_swa"] for r in rows if r["model"] == name and "vs_swa" in r]
        if vs:
            tp = [v["throughput_rel"] for v in vs if v["throughput_rel"] is not None]
            mean[name] = {"seeds": len(vs), "loss_rel_vs_swa": sum(v["loss_rel"] for v in vs) / len(vs),
                          "throughput_rel_vs_swa": sum(tp) / len(tp) if tp else None}  # fmt: skip
    return {"targets": {"loss_rel_max": LOSS_TARGET, "throughput_rel_min": THROUGHPUT_TARGET}, "rows": rows,
            "mean_over_seeds": mean}  # fmt: skip


def print_table(results: dict) -> None:
    print(f"\n{'model':12s} {'seed':>4s} {'params':>8s} {'tokens':>12s} {'val loss':>9s} {'bpb':>6s} {'ppl':>7s} "
          f"{'tok/s':>10s} {'train s':>8s} {'wall s':>8s}")  # fmt: skip
    for r in results["runs"]:
        f = r["final"]
        tps = f"{r['train_tokens_per_s'] / 1e3:9.1f}k" if r.get("train_tokens_per_s") else f"{'n/a':>10s}"
        flag = "" if r["complete"] else "  (incomplete)" if r["finite"] else "  (NON-FINITE)"
        print(f"{r['model']:12s} {r['seed']:4d} {r['params']['total'] / 1e6:7.2f}M {r['tokens_trained']:12,d} "
              f"{f['val_loss']:9.4f} {f['val_bpb']:6.3f} {f['val_ppl']:7.3f} {tps} {r['timed_s']:8.1f} "
              f"{r['wall_s']:8.1f}{flag}")  # fmt: skip
    for row in results["comparison"]["rows"]:
        vs = row.get("vs_swa")
        if vs is None:
            print(f"{row['model']} seed {row['seed']}: no SWA run of this seed to compare with")
            continue
        tp = vs["throughput_rel"]
        tp_txt = "n/a" if tp is None else f"{tp:+.1%} (target >= {THROUGHPUT_TARGET:+.0%}: " \
                 f"{'met' if vs['throughput_target_met'] else 'NOT met'})"  # fmt: skip
        print(f"{row['model']} vs swa, seed {row['seed']}, at {vs['at_tokens']:,d} tokens: val loss "
              f"{vs['loss_rel']:+.2%} (target <= {LOSS_TARGET:+.0%}: {'met' if vs['loss_target_met'] else 'NOT met'})"
              f", throughput {tp_txt}{'' if vs['both_complete'] else '  [a run is incomplete]'}"
              f"{'' if vs['same_device'] else '  [different devices]'}")  # fmt: skip
        if "vs_causal" in row:
            vc = row["vs_causal"]
            tpc = "n/a" if vc["throughput_rel"] is None else f"{vc['throughput_rel']:+.1%}"
            print(f"{row['model']} vs causal, seed {row['seed']}: val loss {vc['loss_rel']:+.2%}, throughput {tpc}")


def plot(results: dict, path: Path) -> bool:
    """Validation loss vs tokens and vs training time; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return False
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results["runs"]:
        pts = [p for p in r["curve"] if p["step"] > 0 and math.isfinite(p["val_loss"])]
        label = f"{r['model']} (seed {r['seed']})"
        ax_tok.plot([p["tokens"] / 1e6 for p in pts], [p["val_bpb"] for p in pts], marker=".", label=label)
        ax_time.plot([p["train_s"] for p in pts], [p["val_bpb"] for p in pts], marker=".", label=label)
    ax_tok.set_xlabel("training tokens (M)")
    ax_time.set_xlabel("training time (s, after warm-up)")
    for ax in (ax_tok, ax_time):
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    c = results["config"]
    fig.suptitle(f"byte-level LM, D={c['dim']}, {c['blocks']} blocks, context {c['context']}, "
                 f"{c['steps'] * c['batch'] * c['context']:,d} tokens per model")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=True))
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file


def merge(paths: list[Path]) -> dict:
    """Combine result files of one configuration and one data set (different models or seeds)."""
    parts = [json.loads(p.read_text()) for p in paths]
    base = parts[0]
    for path, part in zip(paths, parts, strict=True):
        if part.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {part.get('schema')!r}, expected {SCHEMA!r}")
        if part["config"] != base["config"]:
            diff = sorted(k for k in set(part["config"]) | set(base["config"])
                          if part["config"].get(k) != base["config"].get(k))  # fmt: skip
            raise ValueError(f"{path}: configuration differs from {paths[0]} in {diff}; only runs of one "
                             "configuration can be merged")  # fmt: skip
        if part["data"]["sha256"] != base["data"]["sha256"]:
            raise ValueError(f"{path}: trained on other data than {paths[0]} (data sha256 differs)")
    runs, seen = [], set()
    for path, part in zip(paths, parts, strict=True):
        for run in part["runs"]:
            key = (run["model"], run["seed"])
            if key in seen:
                raise ValueError(f"{path}: run {run['model']} seed {run['seed']} appears twice among the inputs")
            seen.add(key)
            runs.append(run)
    return {"schema": SCHEMA, "config": base["config"], "data": base["data"], "runs": runs,
            "comparison": compare(runs), "merged_from": [str(p) for p in paths]}  # fmt: skip


def print_data_report(report: dict) -> None:
    print(f"{'root':14s} {'files':>7s} {'bytes':>13s} {'train files':>11s} {'val files':>9s} {'val bytes':>11s}  "
          "version / path")  # fmt: skip
    for r in report["roots"]:
        print(f"{r['label']:14s} {r['files']:7d} {r['bytes']:13,d} {r['train_files']:11d} {r['val_files']:9d} "
              f"{r['val_bytes']:11,d}  {r['version']}  {', '.join(r['path'])}")  # fmt: skip
    print(f"missing packages: {report['packages_missing'] or 'none'}")
    print(f"skipped files: {report['skipped_files']}")
    print(f"train: {report['train_files']} files, {report['train_bytes']:,d} bytes; val: {report['val_files']} files, "
          f"{report['val_bytes']:,d} bytes ({report['val_bytes'] / (report['train_bytes'] + report['val_bytes']):.2%})"
          f"; listed before the cap: {report['listed_bytes']:,d} bytes; sha256 {report['sha256'][:16]}")  # fmt: skip


# ================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration (all three models, seconds)")
    ap.add_argument("--data-report", action="store_true", help="only collect the data and print its statistics")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="merge result files, print, write --out")
    ap.add_argument("--model", choices=["phalanx", "swa", "causal", "all"], default="all")
    ap.add_argument("--window-blocks", type=int, nargs="+", default=[2], help="Phalanx k (several: an ablation)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (init and data order)")
    ap.add_argument("--tokens", type=int, help="training tokens per model (rounded down to whole steps)")
    ap.add_argument("--out", type=Path, help="results JSON (default quality_results.json; smoke: in the temp dir)")
    ap.add_argument("--plot", type=Path, help="curves PNG (matplotlib; smoke: next to the JSON)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available; smoke: cpu)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every whole model (default: only flex)")
    ap.add_argument("--swa-impl", choices=["auto", "flex", "sdpa"], default="auto",
                    help="SWA kernel: auto = FlexAttention on CUDA, SDPA with a boolean mask elsewhere")  # fmt: skip
    for name in ("dim", "blocks", "global_every", "attn_head_dim", "mlp_hidden", "context", "window", "batch",
                 "eval_every", "val_tokens", "warmup_steps", "max_bytes", "max_file_bytes"):  # fmt: skip
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--val-fraction", type=float)
    ap.add_argument("--packages", nargs="*", help=f"site-packages read (default: {' '.join(DEFAULT_PACKAGES)})")
    ap.add_argument("--no-stdlib", action="store_false", dest="stdlib", default=None)
    ap.add_argument("--phalanx-head-dim", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, help="Phalanx B/C heads (default: all heads, parameter-matched)")
    ap.add_argument("--block-len", type=int, default=16)
    ap.add_argument("--decay-max", type=float, default=0.8)
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[dict, torch.device]:
    """Preset values, overridden by the options given; checked; plus derived step counts."""
    cfg = dict(PRESETS["smoke" if args.smoke else "full"])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    step_tokens = cfg["batch"] * cfg["context"]
    if cfg["tokens"] < step_tokens:
        raise ValueError(f"--tokens {cfg['tokens']} is less than one step ({cfg['batch']} x {cfg['context']})")
    steps = cfg["tokens"] // step_tokens
    if not 0 <= cfg["warmup_steps"] < steps:
        raise ValueError(f"--warmup-steps {cfg['warmup_steps']} must lie in [0, steps={steps}): throughput is "
                         "measured on the steps after it")  # fmt: skip
    for k in args.window_blocks:
        if k < 1:
            raise ValueError(f"--window-blocks takes k >= 1; got {k}")
    if cfg["global_every"] < 1:
        raise ValueError(f"--global-every must be >= 1; got {cfg['global_every']}")
    cfg.update(
        steps=steps,
        eval_every_steps=max(1, round(cfg["eval_every"] / step_tokens)),
        phalanx_head_dim=args.phalanx_head_dim, kv_heads=args.kv_heads, block_len=args.block_len,
        decay_max=args.decay_max, compile=args.compile, swa_impl=args.swa_impl, device=device.type,
        dtype="bf16 autocast, fp32 parameters" if device.type == "cuda" else "fp32",
        betas=list(BETAS), weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, lr_warmup_fraction=LR_WARMUP_FRACTION,
        lr_min_ratio=LR_MIN_RATIO, schedule="linear warm-up, cosine decay", optimizer="AdamW", vocab=VOCAB,
        preset="smoke" if args.smoke else "full",
    )  # fmt: skip
    return cfg, device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        print_table(results)
        out = args.out or Path("quality_results.json")
        write_json(results, out)
        print(f"wrote {out}")
        if args.plot:
            plot(results, args.plot)
        return 0 if all(r["finite"] for r in results["runs"]) else 1

    cfg, device = resolve_config(args)
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    print(f"data collected in {time.perf_counter() - start:.1f} s")
    print_data_report(corpus.report)
    if args.data_report:
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = args.out or (Path(tempfile.gettempdir()) / "swrgen_quality_smoke.json" if args.smoke
                       else Path("quality_results.json"))  # fmt: skip
    plot_path = args.plot or (out.with_suffix(".png") if args.smoke else None)
    locals_ = ["phalanx", "swa", "causal"] if args.model == "all" else [args.model]
    jobs = [(local, k, seed) for seed in args.seed for local in locals_
            for k in (args.window_blocks if local == "phalanx" else [None])]  # fmt: skip
    print(f"{cfg['preset']} on {device}: D={cfg['dim']}, {cfg['blocks']} blocks "
          f"({''.join(s[0].upper() for s in slots(cfg['blocks'], cfg['global_every']))})"
          f", context {cfg['context']}, batch {cfg['batch']}, {cfg['steps']} steps = "
          f"{cfg['steps'] * cfg['batch'] * cfg['context']:,d} tokens per model; runs: "
          f"{[model_name(local, k) + f'@{seed}' for local, k, seed in jobs]}", flush=True)  # fmt: skip
    results: dict = {"schema": SCHEMA, "config": cfg, "data": corpus.report, "runs": [], "comparison": None}
    for local, k, seed in jobs:

        def save_partial(run: dict) -> None:
            write_json({**results, "runs": [*results["runs"], run], "comparison": None}, out)

        results["runs"].append(train_model(cfg, local, k or 0, seed, corpus, device, save_partial))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["comparison"] = compare(results["runs"])
    write_json(results, out)
    print_table(results)
    print(f"wrote {out}")
    if plot_path and plot(results, plot_path):
        print(f"wrote {plot_path}")
    bad = [r["model"] for r in results["runs"] if not r["finite"]]
    if bad:
        print(f"non-finite losses in: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
