"""Decode throughput of the 110M hybrid LM with Phalanx in the local slots, against the same model with
sliding-window attention there (window 512, a KV ring) and with all-causal attention (a KV cache) (GPU).

    python bench/serving/decode.py                     # the default grid, about 3 minutes on an H200
    python bench/serving/decode.py --full              # batch 1..256 x context 4K..32K
    python bench/serving/decode.py --json out.json --plot out.png

Model: ``bench/models/hybrid.py``'s sizes as a :class:`swrgen.models.PhalanxHybridForCausalLM` (D=768,
12 blocks, blocks 2, 5, 8, 11 global causal attention with 12 heads of 64 and RoPE, GELU MLP 4D, vocab
32000 tied), bf16. The three models differ only in the eight local blocks: ``phalanx`` (head_dim 16,
k=2), ``swa512`` (attention over the last 512 tokens), ``causal`` (attention over everything).

What is timed: one decode step of the whole model, token ids ``[B]`` -> logits ``[B, V]``
(:meth:`PhalanxHybridForCausalLM.decode_step`, every sequence at ``context`` tokens; the next token is not
picked), eager and replayed from a CUDA graph (:class:`swrgen.models.DecodeGraph`); tokens/s = B / step
time (median over repeats of ``--steps`` steps, CUDA events). The caches are filled with random values
instead of a prefill (a step's cost does not depend on the values). A configuration whose cache does not
fit in 90% of the free memory is skipped and says so.

Also: per-layer decode time at ``--layer-batch`` (64) sequences of ``Phalanx.decode_`` (input projection +
the generated decode kernel), the whole Phalanx mixer (+ output projection), an SWA-512 attention step and
a causal attention step at each context (projections, RoPE, the KV write, attention); and bytes of state
per sequence (Phalanx states, KV of the local and of the global layers) for each model and context.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

LOCALS = ("phalanx", "swa512", "causal")
KINDS = {"phalanx": "linear_attention", "swa512": "sliding_attention", "causal": "full_attention"}  # layer types
MODES = ("eager", "graph")
DEFAULT_BATCHES = [1, 16, 64, 256]
DEFAULT_CONTEXTS = [4096, 32768]
FULL_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FULL_CONTEXTS = [4096, 8192, 16384, 32768]


def model_config(local: str, smoke: bool = False):
    """The hybrid's config with ``local`` mixers in the local slots (``smoke``: a tiny one for CPU tests)."""
    from bench.alternatives import SWA_WINDOW
    from bench.models.hybrid import DIM, GLOBAL_EVERY, LAYERS, VOCAB
    from swrgen.models import PhalanxHybridConfig

    kind = KINDS[local]
    sizes = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=LAYERS,
                 num_attention_heads=DIM // 64, global_attention_every=GLOBAL_EVERY,
                 sliding_window=SWA_WINDOW)  # fmt: skip
    if smoke:
        sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=2, global_attention_every=3, sliding_window=8)  # fmt: skip
    every, layers = sizes["global_attention_every"], sizes["num_hidden_layers"]
    types = ["full_attention" if i % every == every - 1 else kind for i in range(layers)]
    return PhalanxHybridConfig(layer_types=types, **sizes)


class Timer:
    """Median ms of a callable: CUDA events on a GPU, the wall clock on the CPU (smoke runs only)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def ms(self, fn: Callable[[], Any], reps: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps


def fill_random(cache, context: int, seed: int = 0) -> None:
    """Every slot at ``context`` tokens with random states and KV (a step's cost does not depend on them)."""
    from swrgen.models.cache import KVSlots, PhalanxSlots

    g = torch.Generator(device=cache.pos.device).manual_seed(seed)
    for layer in cache.layers:
        if isinstance(layer, PhalanxSlots):
            layer.data.normal_(0, 0.1, generator=g)
            layer.data[..., 1].uniform_(0, 1, generator=g)
        elif isinstance(layer, KVSlots):
            layer.keys.normal_(0, 1, generator=g)
            layer.values.normal_(0, 1, generator=g)
    set_positions(cache, context)


def set_positions(cache, context: int) -> None:
    cache.pos.fill_(context)
    cache.host_pos = [context] * cache.num_slots


def cache_bytes(config, context: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of state one sequence holds at ``context`` tokens: Phalanx states, the KV of the local slots
    (sliding-window or causal attention) and of the global attention blocks."""
    from swrgen.ops.swr.state import state_width

    item = torch.tensor([], dtype=dtype).element_size()
    kv_token = 2 * config.num_key_value_heads * config.head_dim * item
    every = config.global_attention_every
    out = {"phalanx_state": 0, "local_kv": 0, "global_kv": 0}
    for i, kind in enumerate(config.layer_types):
        if kind == "linear_attention":
            channels = config.phalanx_heads * config.phalanx_head_dim
            out["phalanx_state"] += channels * state_width(config.window_blocks) * 4  # float32
            continue
        tokens = min(context, config.sliding_window) if kind == "sliding_attention" else context
        out["global_kv" if i % every == every - 1 else "local_kv"] += kv_token * tokens
    out["total"] = sum(out.values()) + 8  # + the position
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/serving/decode.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="*", default=None, help=f"batch sizes (default {DEFAULT_BATCHES})")
    ap.add_argument("--contexts", type=int, nargs="*", default=None,
                    help=f"tokens each sequence has seen (default {DEFAULT_CONTEXTS})")  # fmt: skip
    ap.add_argument("--full", action="store_true",
                    help=f"the full grid: batches {FULL_BATCHES}, contexts {FULL_CONTEXTS}")  # fmt: skip
    ap.add_argument("--locals", nargs="*", default=list(LOCALS), choices=LOCALS, help="mixers of the local slots")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="eager and/or CUDA-graph replay")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median counts)")
    ap.add_argument("--layer-batch", type=int, default=64, help="batch of the per-layer timings (0: skip them)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--plot", default=None, help="write a plot here (needs matplotlib: the `bench` extra)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only with --smoke")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and grid: checks the code, not the speed")
    return ap


def time_model(model, local: str, batch: int, context: int, modes: list[str], args, timer: Timer,
               device: torch.device) -> dict[str, Any]:  # fmt: skip
    from swrgen.models import DecodeGraph

    config = model.config
    row: dict[str, Any] = {"local": local, "batch": batch, "context": context}
    max_len = context + args.steps * (args.repeats + 2) + 8
    need = batch * cache_bytes(config, max_len, model.dtype)["total"]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            row["skipped"] = f"cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            return row
    row["cache_gib"] = need / 2**30
    cache = model.new_cache(batch, max_len)
    fill_random(cache, context)
    ids = torch.randint(0, config.vocab_size, (batch,), device=device)
    for mode in modes:
        if mode == "graph" and device.type != "cuda":
            row["graph_ms"] = None
            continue
        set_positions(cache, context)
        if mode == "graph":
            step = DecodeGraph(model, cache, batch, indexed=False)  # step(ids) replays it
        else:
            step = functools.partial(model.decode_step, cache=cache)
        step(ids)
        ms = statistics.median(timer.ms(functools.partial(step, ids), args.steps) for _ in range(args.repeats))
        row[f"{mode}_ms"] = ms
        row[f"{mode}_tokens_per_s"] = batch / (ms * 1e-3)
        del step
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_layers(models: dict, batch: int, contexts: list[int], args, timer: Timer, device: torch.device) -> list[dict]:
    """Per-layer decode steps at ``batch`` sequences: Phalanx.decode_, the Phalanx mixer, SWA-512 and causal
    attention at each context (eager, and replayed from a CUDA graph of 8 steps)."""
    from swrgen.models.cache import KVSlots, PhalanxSlots

    rows = []
    reps = 8
    for context in contexts:
        row: dict[str, Any] = {"batch": batch, "context": context}
        cases: dict[str, Callable[[], Any]] = {}
        keep: list[Any] = []
        for local, model in models.items():
            config = model.config
            kind = KINDS[local]
            idx = config.layer_types.index(kind)
            mixer = model.model.layers[idx].mixer
            x = torch.randn(batch, config.hidden_size, device=device, dtype=model.dtype)
            pos = torch.full((batch,), context, dtype=torch.int64, device=device)
            if kind == "linear_attention":
                pool = PhalanxSlots(batch, config.phalanx_heads, config.phalanx_head_dim, config.window_blocks, device)
                keep.append(pool)
                cases["phalanx_decode_"] = lambda m=mixer, x=x, p=pool, q=pos: m.decode_(x, p.data, q)
                cases["phalanx_layer"] = lambda m=mixer, x=x, p=pool, q=pos: m.out_proj(m.decode_(x, p.data, q))
            else:
                if kind == "full_attention":
                    need = batch * 2 * config.num_key_value_heads * config.head_dim * 2 * (context + 1)
                    if device.type == "cuda" and need > 0.8 * torch.cuda.mem_get_info(device)[0]:
                        row["causal_layer_ms"] = None
                        continue
                window = config.sliding_window if kind == "sliding_attention" else None
                kv = KVSlots(batch, config.num_key_value_heads, config.head_dim, context + 1, window, model.dtype,
                             device)  # fmt: skip
                kv.keys.normal_()
                kv.values.normal_()
                keep.append(kv)
                name = "swa512_layer" if kind == "sliding_attention" else "causal_layer"
                cases[name] = lambda m=mixer, x=x, kv=kv, q=pos: m.decode(x, kv, q, None)
        with torch.no_grad():
            for name, fn in cases.items():
                fn()
                row[f"{name}_ms"] = statistics.median(timer.ms(fn, reps) for _ in range(args.repeats))
                if device.type == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    stream = torch.cuda.Stream(device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        fn()
                    torch.cuda.current_stream(device).wait_stream(stream)
                    with torch.cuda.graph(graph):
                        for _ in range(reps):
                            fn()
                    row[f"{name}_graph_ms"] = statistics.median(timer.ms(graph.replay, 1) / reps
                                                                for _ in range(args.repeats))  # fmt: skip
                    del graph
        rows.append(row)
        del keep, cases
    return rows


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["decode"] if "skipped" not in r]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts) + 1, figsize=(5.5 * (len(contexts) + 1), 4.5), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=False):
        for local in LOCALS:
            for mode, style in (("eager", "--"), ("graph", "-")):
                key = f"{mode}_tokens_per_s"
                pts = sorted((r["batch"], r[key]) for r in rows
                             if r["local"] == local and r["context"] == context and r.get(key))  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{local} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title=f"decode, context {context}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for local in LOCALS:
        pts = sorted((b["context"], b["total"]) for b in result["bytes_per_sequence"] if b["local"] == local)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=local)
    ax.set(xscale="log", yscale="log", xlabel="context", ylabel="bytes per sequence", title="decode state")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        common.require_cuda("bench/serving/decode.py")
    elif not args.smoke:
        raise SystemExit("bench/serving/decode.py times a GPU: --device cpu is only for --smoke runs")
    from swrgen.models import PhalanxHybridForCausalLM  # needs the `hf` extra (transformers)

    batches = args.batches or (FULL_BATCHES if args.full else DEFAULT_BATCHES)
    contexts = args.contexts or (FULL_CONTEXTS if args.full else DEFAULT_CONTEXTS)
    if args.smoke:
        batches, contexts = args.batches or [1, 3], args.contexts or [20, 40]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}  torch {torch.__version__}  batches {batches}  contexts {contexts}  modes {args.modes}", flush=True)
    timer = Timer(device)
    models = {}
    for local in args.locals:
        torch.manual_seed(0)
        models[local] = PhalanxHybridForCausalLM(model_config(local, args.smoke)).to(device=device, dtype=dtype).eval()
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "params": params,
                              "config": models[args.locals[0]].config.to_dict(), "decode": [], "layers": [],
                              "bytes_per_sequence": []}  # fmt: skip
    for local, model in models.items():
        for context in sorted(set(contexts)):
            result["bytes_per_sequence"].append({"local": local, "context": context,
                                                 **cache_bytes(model.config, context, dtype)})  # fmt: skip
    with torch.no_grad():
        for context in contexts:
            for batch in batches:
                cells = []
                for local, model in models.items():
                    row = time_model(model, local, batch, context, args.modes, args, timer, device)
                    result["decode"].append(row)
                    if "skipped" in row:
                        cells.append(f"{local}: skipped ({row['skipped']})")
                    else:
                        cells.append(f"{local}: " + " ".join(
                            f"{m} {row[f'{m}_ms']:.3f} ms {row[f'{m}_tokens_per_s'] / 1e3:.1f}k tok/s"
                            for m in args.modes if row.get(f"{m}_ms") is not None))  # fmt: skip
                print(f"context {context:6d} batch {batch:4d}  " + " | ".join(cells), flush=True)
    if args.layer_batch:
        result["layers"] = time_layers(models, args.layer_batch, contexts, args, timer, device)
        for row in result["layers"]:
            cells = "  ".join(f"{k[:-3]} {v:.4f} ms" for k, v in row.items() if k.endswith("_ms") and v is not None)
            print(f"per layer, batch {row['batch']} context {row['context']}: {cells}", flush=True)
    for b in result["bytes_per_sequence"]:
        print(f"bytes/sequence {b['local']:8s} context {b['context']:6d}: Phalanx state {b['phalanx_state']:,}  "
              f"local KV {b['local_kv']:,}  global KV {b['global_kv']:,}  total {b['total']:,}")  # fmt: skip
    common.write_json(args.json, result)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("no plot: matplotlib is missing (pip install 'swrgen[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
