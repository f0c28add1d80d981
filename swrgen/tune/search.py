"""The autotuner: for each shape bucket, check every candidate against float64, time it, keep the best.

Per candidate: build ``swrgen.load(spec.replace_target(**cand))``, run forward and backward on fresh
random inputs (x ~ N(0, 1), gates ~ U(0.5, 1), outputs poisoned with NaN first) at a check shape of at
most ``CHECK_ELEMS`` elements and compare with the float64 reference ``swr_reference`` and its autograd
gradients; a candidate over tolerance, or one that raises, is reported and skipped, never chosen. Then
forward and backward are timed at the real shape (``triton.testing.do_bench`` median if importable,
else a median of CUDA-event timings) and scored by fwd + bwd ("train") or fwd alone ("fwd").
The winner of each bucket is saved with :func:`swrgen.tune.store.save`.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from swrgen import constants
from swrgen.spec import Spec
from swrgen.tune import space, store
from swrgen.tune.buckets import bucket_name, bucket_of

OBJECTIVES = ("train", "fwd")
# Forward tolerance by output dtype: a 16-bit output carries its own rounding (~1.6e-3 rms for bf16).
FWD_TOL = {"fp32": 2e-3, "bf16": 8e-3, "fp16": 8e-3}
BWD_TOL = 5e-3
CHECK_ELEMS = 1 << 22  # x elements of the correctness check: keeps the float64 autograd reference small
CHECK_MAX_LEN = 16384
# Keep the spec's own target unless the best candidate beats it by this much: repeated medians of one
# kernel differ by ~1%, and a stored "winner" inside that noise would only churn.
MIN_GAIN = 0.02


def _print(msg: str) -> None:
    print(msg, flush=True)  # progress must show up line by line even when piped through tee


def device_arch(spec: Spec, device: torch.device) -> str:
    """The arch the spec's cubin runs as on ``device`` (what Program.arch_for picks)."""
    from swrgen.runtime.program import native_arch, pick_arch

    cap = torch.cuda.get_device_capability(device)
    return pick_arch(spec.target.archs, cap) or native_arch(cap)


def normalize_shape(spec: Spec, shape: Iterable[int]) -> tuple[int, int, int, int]:
    """(B, H, L) or (B, H, DH, L) -> (B, H, DH, L) with DH the spec's head_dim."""
    dims = tuple(int(v) for v in shape)
    head_dim = spec.recurrence.head_dim
    if len(dims) == 3:
        dims = (dims[0], dims[1], head_dim, dims[2])
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"shape {shape!r}: expected B,H,L or B,H,DH,L of positive integers")
    if dims[2] != head_dim:
        raise ValueError(f"shape {shape!r} has head_dim {dims[2]} but spec {spec.name!r} has {head_dim}")
    return dims  # type: ignore[return-value]


def check_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A shape of at most CHECK_ELEMS elements with the same L residue (kernel choice, partial tile)."""
    batch, heads, head_dim, length = shape
    if length > CHECK_MAX_LEN:
        length = CHECK_MAX_LEN + length % 64  # 64 = the largest block_len: same tail tile, same kernel
    batch = min(batch, 2)
    heads = max(1, min(heads, CHECK_ELEMS // (batch * head_dim * length)))
    return batch, heads, head_dim, length


def random_inputs(spec: Spec, shape: tuple[int, int, int, int], seed: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gates ~ U(0.5, 1) ([B, H, L] or per channel), x ~ N(0, 1), in the spec's dtypes, on ``device``."""
    r = spec.recurrence
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device).to(constants.torch_dtype(r.input_dtype))
    gate_shape = shape if r.gate_layout == "per_channel" else (shape[0], shape[1], shape[3])
    a = (0.5 + 0.5 * torch.rand(gate_shape, generator=g, device=device)).to(constants.torch_dtype(r.gate_dtype))
    return a, x


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/inf (e.g. an unwritten poisoned element)."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _forward(program, a, x):
    from swrgen.ops.swr import launch

    try:
        return launch.forward(program, a, x, poison=float("nan"))
    except TypeError:  # a launch.forward without the poison keyword
        return launch.forward(program, a, x)


def _backward(program, a, x, dy):
    from swrgen.ops.swr import launch

    try:
        return launch.backward(program, a, x, dy, poison=float("nan"))
    except TypeError:
        return launch.backward(program, a, x, dy)


def check_program(program, spec: Spec, shape: tuple[int, int, int, int], seed: int,
                  device: torch.device) -> tuple[float, float]:  # fmt: skip
    """(forward rel err, worst of dx/da rel err) against float64 on fresh inputs of ``shape``."""
    from swrgen.ops.swr.reference import swr_reference

    r = spec.recurrence
    a, x = random_inputs(spec, shape, seed, device)
    y = _forward(program, a, x)
    dy = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    dy = dy.to(y.dtype)
    dx, da = _backward(program, a, x, dy)
    a64 = a.double().requires_grad_()
    x64 = x.double().requires_grad_()
    ref = swr_reference(a64, x64, r.window_blocks, r.block_len)
    gx, ga = torch.autograd.grad(ref, (x64, a64), dy.double())
    return rel_err(y, ref.detach()), max(rel_err(dx, gx), rel_err(da, ga))


def make_timer(warmup_ms: float, rep_ms: float) -> tuple[Callable[[Callable[[], Any]], float], str]:
    """(fn -> median ms, method name): do_bench when Triton is importable, else CUDA events."""
    try:
        from triton.testing import do_bench

        def bench(fn: Callable[[], Any]) -> float:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

        return bench, "triton.testing.do_bench median"
    except ImportError:
        return (lambda fn: event_median_ms(fn, warmup_ms, rep_ms)), "CUDA events median"


def event_median_ms(fn: Callable[[], Any], warmup_ms: float = 10.0, rep_ms: float = 40.0) -> float:
    """Median of per-call CUDA-event times; call counts sized from a first timed call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    for _ in range(int(warmup_ms / once)):
        fn()
    times = []
    for _ in range(max(3, min(1000, int(rep_ms / once)))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _context_ok() -> bool:
    """False once the CUDA context is broken (a sticky error such as an illegal address)."""
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def tune(spec: Spec, shapes: Iterable[Iterable[int]], *, device: str | torch.device = "cuda",
         grid: Mapping[str, Iterable[Any]] | None = None, progress: Callable[[str], Any] | None = _print,
         rep_ms: float = 40.0, warmup_ms: float = 10.0, objective: str = "train", save: bool = True,
         directory: Any = None, min_gain: float = MIN_GAIN) -> dict[str, Any]:  # fmt: skip
    """Search the tuning space of ``spec`` for each shape bucket; save and return the winners.

    shapes: (B, H, L) or (B, H, DH, L) tuples; shapes in one bucket are tuned once (the first).
    The spec's own target is kept unless a candidate's score is better by more than ``min_gain``.
    Returns {"arch", "nvrtc", "device", "objective", "timer", "candidates", "buckets": {name: {"shape",
    "winner" (entry or None), "results" (one dict per candidate), "file"}}}.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA device (torch.cuda.is_available() is False)")
    import swrgen
    from swrgen.ops.swr import launch

    say = progress or (lambda _msg: None)
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    arch = device_arch(spec, device)
    cands = space.candidates(spec, arch, grid)
    timer, timer_name = make_timer(warmup_ms, rep_ms)
    buckets: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for shape in shapes:
        dims = normalize_shape(spec, shape)
        buckets.setdefault(bucket_of(dims), []).append(dims)
    if not buckets:
        raise ValueError("no shapes to tune")
    device_name = torch.cuda.get_device_name(device)
    result: dict[str, Any] = {"spec": spec.name, "arch": arch, "nvrtc": store.compiler_version(),
                              "device": device_name, "objective": objective, "timer": timer_name,
                              "candidates": len(cands), "buckets": {}}  # fmt: skip
    say(f"tuning {spec.name} on {device_name} ({arch}, NVRTC {result['nvrtc']}): {len(cands)} candidates x "
        f"{len(buckets)} bucket(s), objective {objective}, timer {timer_name}")  # fmt: skip
    baseline_key = tuple(space.current(spec)[k] for k in space.TUNABLE)
    with torch.cuda.device(device), store.disabled():
        for bucket, members in buckets.items():
            shape = members[0]
            cshape = check_shape(shape)
            name = bucket_name(bucket)
            say(
                f"bucket {name}: timing shape {'x'.join(map(str, shape))}, check shape "
                f"{'x'.join(map(str, cshape))}" + (f" (also serves {members[1:]})" if len(members) > 1 else "")
            )
            a, x = random_inputs(spec, shape, seed=12345, device=device)
            dy = torch.randn(shape, device=device).to(constants.torch_dtype(spec.recurrence.output_dtype))
            rows: list[dict[str, Any]] = []
            t_start = time.perf_counter()
            for i, cand in enumerate(cands, 1):
                row: dict[str, Any] = {"target": cand, "ok": False}
                label = f"[{i}/{len(cands)}] {space.describe(cand)}"
                try:
                    program = swrgen.load(spec.replace_target(**cand)).program
                    err_f, err_b = check_program(program, spec, cshape, seed=1000 * i + bucket[1] % 997,
                                                 device=device)  # fmt: skip
                    row.update(err_fwd=err_f, err_bwd=err_b)
                    tol_f = FWD_TOL[spec.recurrence.output_dtype]
                    if not (err_f <= tol_f and err_b <= BWD_TOL):
                        row["reason"] = f"wrong result: rel err fwd {err_f:.2e} (tol {tol_f}), bwd {err_b:.2e} " \
                                        f"(tol {BWD_TOL})"  # fmt: skip
                        say(f"{label}  FAILED {row['reason']}")
                        rows.append(row)
                        continue
                    fwd = timer(lambda p=program, a=a, x=x: launch.forward(p, a, x))
                    bwd = timer(lambda p=program, a=a, x=x, dy=dy: launch.backward(p, a, x, dy))
                    score = fwd + bwd if objective == "train" else fwd
                    row.update(ok=True, fwd_ms=fwd, bwd_ms=bwd, score_ms=score)
                    eta = (time.perf_counter() - t_start) / i * (len(cands) - i)
                    say(f"{label}  fwd {fwd:.4f} ms  bwd {bwd:.4f} ms  (err {err_f:.1e}/{err_b:.1e}, "
                        f"eta {eta:.0f} s)")  # fmt: skip
                except Exception as err:  # compile error, launch failure, ...: report, never choose
                    row["reason"] = _first_line(err)
                    say(f"{label}  FAILED {row['reason']}")
                    if not _context_ok():
                        rows.append(row)
                        raise RuntimeError(f"CUDA context broken after candidate {space.describe(cand)}: "
                                           f"{row['reason']}") from err  # fmt: skip
                rows.append(row)
            passed = [r for r in rows if r["ok"]]
            entry_out: dict[str, Any] | None = None
            path = None
            if passed:
                best = min(passed, key=lambda r: r["score_ms"])
                base = next((r for r in passed if tuple(r["target"][k] for k in space.TUNABLE) == baseline_key),
                            None)  # fmt: skip
                if base is not None and best["score_ms"] > base["score_ms"] * (1 - min_gain):
                    best = base  # within noise of the spec's own choice
                entry_out = {"target": dict(best["target"]), "fwd_ms": best["fwd_ms"], "bwd_ms": best["bwd_ms"],
                             "score_ms": best["score_ms"], "objective": objective, "shape": list(shape),
                             "device": device_name, "timer": timer_name,
                             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "candidates": len(rows), "failed": len(rows) - len(passed),
                             "baseline": {"target": space.current(spec),
                                          "score_ms": base["score_ms"] if base else None}}  # fmt: skip
                if save:
                    path = str(store.save(spec, arch, shape, entry_out, directory))
                gain = f", {base['score_ms'] / best['score_ms']:.2f}x vs the spec's own target" if base else ""
                say(f"bucket {name}: best {space.describe(best['target'])}  fwd {best['fwd_ms']:.4f} ms  "
                    f"bwd {best['bwd_ms']:.4f} ms{gain}; {len(rows) - len(passed)} failed"
                    + (f"; saved to {path}" if path else ""))  # fmt: skip
            else:
                say(f"bucket {name}: every candidate failed; nothing saved")
            result["buckets"][name] = {"shape": list(shape), "shapes": [list(m) for m in members],
                                       "winner": entry_out, "results": rows, "file": path}  # fmt: skip
            del a, x, dy
    return result


def lookup(spec: Spec, arch: str, shape: tuple[int, int, int, int]) -> dict[str, Any] | None:
    """Tuned target overrides for x.shape = [B, H, DH, L] (see :func:`swrgen.tune.store.lookup`)."""
    return store.lookup(spec, arch, shape)
