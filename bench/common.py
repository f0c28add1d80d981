"""What every benchmark shares: timing, the copy-bandwidth floor, the bytes each kernel moves, inputs, argument
parsing. Imports nothing GPU-only at module level (Triton and swrgen's runtime load inside the functions).

Timing: :func:`bench_ms` is ``triton.testing.do_bench`` with ``return_mode="median"`` (it flushes L2 between
calls and times each call alone, so a call's host latency shows once it outlasts the flush), or a median of
CUDA-event timings where Triton is missing; :func:`stream_ms` times calls issued back to back, the rate a
training loop sees. The floor of a kernel is the bytes it must
move (each input read once, each output written once) over the bandwidth of a 1 GiB device-to-device copy
measured in the same run (:func:`copy_bandwidth`, bytes read + written); docs/performance.md explains it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 16  # the benchmarks' SWR head size (the paper's Phalanx layer)
SLOW_MS = 50.0  # measure(): calls slower than this are timed by a few event-timed calls instead of do_bench


# ------------------------------------------------------------------ timing


def bench_ms(fn: Callable[[], Any], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median ms of ``fn``: Triton's do_bench where importable, else a median of CUDA-event timings."""
    try:
        from triton.testing import do_bench
    except ImportError:
        from swrgen.tune.search import event_median_ms

        return event_median_ms(fn, warmup_ms, rep_ms)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


STREAM_CALLS = 200  # stream_ms: calls a timing; the spin's head start is at most ~0.5 us of each
SPIN_CYCLES = 200_000  # about 0.1 ms of GPU spin before a stream_ms timing


def stream_ms(fn: Callable[[], Any], calls: int = STREAM_CALLS, reps: int = 5) -> float:
    """Median ms a call over ``calls`` calls issued back to back (no synchronize and no L2 flush between them),
    as a training step issues its ops: a call's host time hides behind the GPU work queued before it, and
    only a host slower than the GPU shows. A short GPU spin first keeps the first call's launch out of the
    timing. Compare it with the kernel timed the same way (the L2 keeps a little of the last call's data)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def event_ms(fn: Callable[[], Any]) -> float:
    """One call, timed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(fn: Callable[[], Any], warmup_ms: float, rep_ms: float, max_ms: float) -> tuple[float | None, str]:
    """(median ms, note) of a call that may be slow. One untimed call first (compiles, autotunes), one timed
    call to size the rest: above ``max_ms`` the result is dropped (the note says why); above SLOW_MS a few
    event-timed calls; otherwise :func:`bench_ms`."""
    fn()
    torch.cuda.synchronize()
    once = event_ms(fn)
    if once > max_ms:
        return None, f"one call takes {once:.0f} ms > {max_ms:.0f} ms limit"
    if once > SLOW_MS:
        n = max(2, min(5, int(4 * rep_ms / once)))
        return statistics.median([once] + [event_ms(fn) for _ in range(n)]), f"median of {n + 1} event timings"
    return bench_ms(fn, warmup_ms, rep_ms), ""


def copy_bandwidth(moved: int = 2 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy that moves ``moved`` bytes (read + written;
    default a 1 GiB copy: the floors' denominator)."""
    src = torch.empty(max(1, moved // 8), dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ------------------------------------------------------------------ bytes and floors


def swr_bytes(x: torch.Tensor, a: torch.Tensor, out_itemsize: int) -> tuple[int, int]:
    """(forward, backward) bytes of the plain SWR kernels, each tensor read or written once.

    Forward: x + a read, y written. Backward: x + a + dy read, dx (x's size) + da (a's size) written.
    ``out_itemsize``: bytes per element of y (and so of dy)."""
    xb, ab, yb = x.numel() * x.element_size(), a.numel() * a.element_size(), x.numel() * out_itemsize
    return xb + ab + yb, 2 * xb + 2 * ab + yb


def gating_bytes(P: torch.Tensor, z_numel: int) -> tuple[int, int]:
    """(forward, backward) bytes of the fused Phalanx kernels: forward P read + Z written; backward P + dZ
    read, dP written (Z, dZ and dP in P's dtype)."""
    pb, zb = P.numel() * P.element_size(), z_numel * P.element_size()
    return pb + zb, 2 * pb + zb


def pct_of_floor(nbytes: int, bandwidth: float, ms: float) -> float:
    """Share of the copy-bandwidth floor (100 = as fast as a copy of the same bytes)."""
    return 100 * nbytes / bandwidth / (ms * 1e-3)


# ------------------------------------------------------------------ inputs


def swr_inputs(batch: int, heads: int, length: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               device: str | torch.device = "cuda") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gates U(0.5, 1) [B, H, L] and x ~ N(0, 1) [B, H, 16, L] (x drawn first), what every SWR benchmark times."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, heads, HEAD_DIM, length, device=device, generator=g).to(dtype)
    a = (0.5 + 0.5 * torch.rand(batch, heads, length, device=device, generator=g)).to(dtype)
    return a, x


# ------------------------------------------------------------------ arguments and output


def shape_type(names: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for a comma-separated shape such as ``B,H,L`` (every size >= 1)."""
    want = names.split(",")

    def parse(text: str) -> tuple[int, ...]:
        try:
            dims = tuple(int(v) for v in text.split(","))
        except ValueError:
            dims = ()
        if len(dims) != len(want):
            raise argparse.ArgumentTypeError(f"shape {text!r}: expected {names} ({len(want)} integers)")
        if min(dims) < 1:
            raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be >= 1")
        return dims

    return parse


def parse_knobs(text: str) -> dict[str, int | bool | str]:
    """``"tiles_per_warp=15,staging=shared,persistent=true"`` -> target overrides (int, bool or word)."""
    knobs: dict[str, int | bool | str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"knob {item!r}: expected NAME=VALUE")
        low = val.strip().lower()
        knobs[key.strip()] = low == "true" if low in ("true", "false") else int(val) if val.strip().isdigit() else val
    return knobs


def require_cuda(what: str) -> None:
    """Exit with a clear message where torch sees no GPU (every timing needs one)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA device: torch.cuda.is_available() is False here")


def write_json(path: str | Path | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


def tuned_and_untuned(run: Callable[[], tuple[Callable[[], Any], Callable[[], Any], tuple[torch.Tensor, ...]]],
                      ) -> tuple[tuple[float, float], tuple[float, float], bool]:  # fmt: skip
    """``run() -> (forward fn, backward fn, outputs)`` with the stored tuned configs and with
    ``SWRGEN_TUNED=0``: ((fwd ms, bwd ms) tuned, the same untuned, whether the outputs are bitwise equal)."""
    import os

    from swrgen.tune import store

    times, outs = [], []
    for setting in (None, "0"):
        if setting is None:
            os.environ.pop(store.ENV_DISABLE, None)
        else:
            os.environ[store.ENV_DISABLE] = setting
        store.clear_memo()  # re-reads the environment; launch plans see the new store generation
        fwd, bwd, out = run()
        times.append((bench_ms(fwd), bench_ms(bwd)))
        outs.append(out)
    os.environ.pop(store.ENV_DISABLE, None)
    store.clear_memo()
    same = all(torch.equal(u, v) for u, v in zip(outs[0], outs[1], strict=True))
    return times[0], times[1], same
