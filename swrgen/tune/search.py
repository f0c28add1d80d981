"""The autotuner: for each shape bucket, check every candidate against float64, time it, keep the best.

Which kernels are tuned depends on the spec (:func:`family_for`): a *kernel family* says how to read a
shape, make inputs, check a candidate and time it; the search loop (:func:`tune`) is shared.

* ``swr`` (plain specs): the SWR kernels ``swr_fwd_*`` / ``swr_bwd_*`` (``swrgen.ops.swr.launch``).
  Shapes are ``(B, H, L)`` or ``(B, H, DH, L)``. Check inputs: x ~ N(0, 1), gates ~ U(0.5, 1); the
  reference is ``swr_reference`` and its autograd gradients (dx, da).
* ``phalanx`` (specs with ``recurrence.fused_gating: true``): the fused Phalanx kernels
  ``phalanx_fwd_{vec,scalar}`` / ``phalanx_bwd_{vec,scalar}`` (``swrgen.ops.phalanx.launch``). Shapes
  are ``(B, L, H)``: batch, tokens, heads, with the spec's head_dim (16) and kv_heads = heads, so the
  projections P are ``[B, L, H + 2*H*16 + H*16]``. Check inputs: P ~ N(0, 1) (the kernels apply the
  sigmoids), decay_max 0.8; the reference is ``phalanx_gating_reference`` and its autograd gradient dP
  (its A | B | C | V column blocks checked one by one too, as tests/test_gpu_phalanx_fused.py does).
  The bucket is that of ``(B, H, 16, L)``: rows = B*H (one warp per head) and L.

Per candidate: build ``swrgen.load(spec.replace_target(**cand))``, run forward and backward on fresh
random inputs (outputs poisoned with NaN first) at a check shape of at most ``CHECK_ELEMS`` elements
and compare with the float64 reference; a candidate over tolerance, or one that raises, is reported
and skipped, never chosen. Then forward and backward are timed at the real shape
(``triton.testing.do_bench`` median if importable, else a median of CUDA-event timings) and scored by
fwd + bwd ("train") or fwd alone ("fwd"). The winner of each bucket is saved with
:func:`swrgen.tune.store.save` under the bucket of ``(B, H, DH, L)``; its entry records the family and
the shape as given.
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
# Fused Phalanx kernels, by P's dtype (Z and dP are stored in it): tests/test_gpu_phalanx_fused.py's TOL.
FUSED_TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}
FUSED_DECAY_MAX = 0.8  # the Phalanx layer's default: gates a = 0.8 * sigmoid(P_A)
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
    """A shape as given for ``spec``'s kernel family -> (B, H, DH, L) with DH the spec's head_dim.

    Plain specs: (B, H, L) or (B, H, DH, L). Specs with ``fused_gating``: (B, L, H). Raises ValueError.
    """
    return family_for(spec).normalize(spec, shape)


def normalize_swr_shape(spec: Spec, shape: Iterable[int]) -> tuple[int, int, int, int]:
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


def normalize_fused_shape(spec: Spec, shape: Iterable[int]) -> tuple[int, int, int, int]:
    """(B, L, H) of a fused spec (batch, tokens, heads; kv_heads = heads) -> (B, H, DH, L), DH the spec's."""
    dims = tuple(int(v) for v in shape)
    head_dim = spec.recurrence.head_dim
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(
            f"shape {shape!r}: spec {spec.name!r} has fused_gating (the fused Phalanx kernels), so a shape is "
            f"B,L,H (batch, tokens, heads) of positive integers; head_dim is the spec's ({head_dim})"
        )
    batch, length, heads = dims
    return batch, heads, head_dim, length


def check_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A shape of at most CHECK_ELEMS elements with the same L residue (kernel choice, partial tile)."""
    batch, heads, head_dim, length = shape
    if length > CHECK_MAX_LEN:
        length = CHECK_MAX_LEN + length % 64  # 64 = the largest block_len: same tail tile, same kernel
    batch = min(batch, 2)
    heads = max(1, min(heads, CHECK_ELEMS // (batch * head_dim * length)))
    return batch, heads, head_dim, length


def fused_vec_heads(heads: int) -> bool:
    """Whether the projections of ``heads`` heads (kv_heads = heads, head_dim 16) have 16-byte aligned
    rows and column blocks, which the fused "vec" kernels need (with 16-bit P; see use_vector_kernel)."""
    from swrgen.ops.phalanx.layout import GatingLayout

    layout = GatingLayout(heads, heads, constants.CHANNELS_PER_WARP)
    cols = (layout.col_b, layout.col_c, layout.col_v, layout.width)
    return all((c * 2) % constants.VECTOR_BYTES == 0 for c in cols)


def fused_check_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """:func:`check_shape` for the fused kernels, keeping whether the vec or the scalar kernels run.

    (With every 8th head count the vec kernels run: fewer heads are checked as a multiple of 8 then,
    on one sequence if two would be too many elements; otherwise as a count that is not one.)
    """
    batch, heads, head_dim, length = check_shape(shape)
    if fused_vec_heads(shape[1]):
        while heads > 1 and not fused_vec_heads(heads):
            heads -= 1
        if not fused_vec_heads(heads):  # fewer than the smallest vec head count fit: take it anyway
            heads = next(h for h in range(1, shape[1] + 1) if fused_vec_heads(h))
            if batch * heads * head_dim * length > CHECK_ELEMS:
                batch = 1
    elif fused_vec_heads(heads):
        heads -= 1  # >= 1: one head is never vec-aligned
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


def fused_layout(shape: tuple[int, int, int, int]):
    """The GatingLayout of (B, H, DH, L): kv_heads = heads."""
    from swrgen.ops.phalanx.layout import GatingLayout

    return GatingLayout(shape[1], shape[1], shape[2])


def random_projections(spec: Spec, shape: tuple[int, int, int, int], seed: int, device: torch.device) -> torch.Tensor:
    """Projections P [B, L, H + 2*H*DH + H*DH] ~ N(0, 1) in the spec's input dtype (gate logits too:
    the kernels apply the sigmoids), for (B, H, DH, L)."""
    batch, _, _, length = shape
    g = torch.Generator(device=device).manual_seed(seed)
    P = torch.randn((batch, length, fused_layout(shape).width), generator=g, device=device)
    return P.to(constants.torch_dtype(spec.recurrence.input_dtype))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/inf (e.g. an unwritten poisoned element)."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_program(program, spec: Spec, shape: tuple[int, int, int, int], seed: int,
                  device: torch.device) -> tuple[float, float]:  # fmt: skip
    """(forward rel err, worst of dx/da rel err) against float64 on fresh inputs of ``shape``."""
    from swrgen.ops.swr import launch
    from swrgen.ops.swr.reference import swr_reference

    r = spec.recurrence
    a, x = random_inputs(spec, shape, seed, device)
    y, _, _ = launch.forward(program, a, x, poison=float("nan"))
    dy = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    dy = dy.to(y.dtype)
    dx, da, _ = launch.backward(program, a, x, dy, poison=float("nan"))
    a64 = a.double().requires_grad_()
    x64 = x.double().requires_grad_()
    ref = swr_reference(a64, x64, r.window_blocks, r.block_len)
    gx, ga = torch.autograd.grad(ref, (x64, a64), dy.double())
    return rel_err(y, ref.detach()), max(rel_err(dx, gx), rel_err(da, ga))


def check_fused_program(program, spec: Spec, shape: tuple[int, int, int, int], seed: int,
                        device: torch.device) -> tuple[float, float]:  # fmt: skip
    """(Z rel err, dP err) of the fused kernels against float64 on fresh P for (B, H, DH, L).

    The dP error is the worst of dP's rel err and half of each column block's (A | B | C | V), so
    ``<= tol`` means what tests/test_gpu_phalanx_fused.py asserts (a block may reach twice the tolerance):
    a wrong dA, only H of the N columns, cannot hide in the norm over all of them.
    """
    from swrgen.ops.phalanx import launch
    from swrgen.ops.phalanx.reference import phalanx_gating_reference

    r = spec.recurrence
    layout = fused_layout(shape)
    P = random_projections(spec, shape, seed, device)
    Z, _, _ = launch.forward(program, P, layout, FUSED_DECAY_MAX, poison=float("nan"))
    dZ = torch.randn(Z.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    dZ = dZ.to(Z.dtype)
    dP, _ = launch.backward(program, P, dZ, layout, FUSED_DECAY_MAX, poison=float("nan"))
    P64 = P.double().requires_grad_()
    ref = phalanx_gating_reference(P64, layout, r.window_blocks, r.block_len, FUSED_DECAY_MAX)
    (gP,) = torch.autograd.grad(ref, P64, dZ.double())
    err_b = rel_err(dP, gP)
    for lo, n in zip((layout.col_a, layout.col_b, layout.col_c, layout.col_v), layout.split, strict=True):
        err_b = max(err_b, rel_err(dP[..., lo : lo + n], gP[..., lo : lo + n]) / 2)
    return rel_err(Z, ref.detach()), err_b


# ---------------------------------------------------------------- kernel families

Launcher = Callable[[Any], Any]  # program -> one launch on the bucket's timing inputs


class KernelFamily:
    """How the tuner drives one family of a spec's kernels; :func:`tune` runs the (shared) search loop.

    ``name`` is what progress output and results call the family (``title`` in words), ``kernels`` the
    kernels it times, ``shape_format`` how a shape is given (``swrgen tune --shape``), ``default_shape``
    the CLI's default, ``unused_knobs`` the tuning knobs its kernels ignore (kept at the spec's value).
    Internally a shape is (B, H, DH, L) (:meth:`normalize`): what buckets and the store key on.
    """

    name = ""
    title = ""
    kernels = ""
    shape_format = ""
    default_shape: tuple[int, ...] = ()
    unused_knobs: tuple[str, ...] = ()

    def grid(self, spec: Spec, grid: Mapping[str, Iterable[Any]] | None) -> dict[str, Iterable[Any]]:
        """The grid to search: ``grid`` with the unused knobs pinned to the spec's own values."""
        return {**(grid or {}), **{knob: (getattr(spec.target, knob),) for knob in self.unused_knobs}}

    def normalize(self, spec: Spec, shape: Iterable[int]) -> tuple[int, int, int, int]:
        """The shape as given -> (B, H, DH, L); ValueError with a clear message when malformed."""
        raise NotImplementedError

    def given(self, dims: tuple[int, int, int, int]) -> list[int]:
        """(B, H, DH, L) -> the shape as given (progress, results and the stored entry record this)."""
        return list(dims)

    def label(self, dims: tuple[int, int, int, int]) -> str:
        return "x".join(map(str, dims))

    def check_shape(self, dims: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """The (smaller) shape a candidate's correctness is checked at."""
        raise NotImplementedError

    def tolerances(self, spec: Spec) -> tuple[float, float]:
        """(forward, backward) limits of what :meth:`check` returns."""
        raise NotImplementedError

    def check(self, program, spec: Spec, dims: tuple[int, int, int, int], seed: int,
              device: torch.device) -> tuple[float, float]:  # fmt: skip
        """(forward err, backward err) of ``program`` against float64 on fresh inputs, outputs poisoned."""
        raise NotImplementedError

    def timed(self, spec: Spec, dims: tuple[int, int, int, int], device: torch.device) -> tuple[Launcher, Launcher]:
        """(forward, backward) launchers on inputs of the real shape, made once per bucket."""
        raise NotImplementedError


class SwrFamily(KernelFamily):
    """The plain SWR kernels: x [B, H, DH, L] and gates in, y out; backward dx, da."""

    name = "swr"
    title = "plain SWR kernels"
    kernels = "swr_fwd_* / swr_bwd_*"
    shape_format = "B,H,L (or B,H,DH,L)"
    default_shape = (4, 64, 8192)

    def normalize(self, spec, shape):
        return normalize_swr_shape(spec, shape)

    def check_shape(self, dims):
        return check_shape(dims)

    def tolerances(self, spec):
        return FWD_TOL[spec.recurrence.output_dtype], BWD_TOL

    def check(self, program, spec, dims, seed, device):
        return check_program(program, spec, dims, seed, device)

    def timed(self, spec, dims, device):
        from swrgen.ops.swr import launch

        a, x = random_inputs(spec, dims, seed=12345, device=device)
        dy = torch.randn(dims, device=device).to(constants.torch_dtype(spec.recurrence.output_dtype))
        return (lambda p: launch.forward(p, a, x)), (lambda p: launch.backward(p, a, x, dy))


class PhalanxFamily(KernelFamily):
    """The fused Phalanx kernels of a ``fused_gating`` spec: P [B, L, N] in, Z out; backward dP.

    Shapes are (B, L, H) with kv_heads = heads; decay_max is FUSED_DECAY_MAX (it does not change speed).
    """

    name = "phalanx"
    title = "fused Phalanx kernels"
    kernels = "phalanx_fwd_{vec,scalar} / phalanx_bwd_{vec,scalar}"
    shape_format = "B,L,H"
    default_shape = (4, 8192, 64)
    unused_knobs = ("staging",)  # the fused kernels keep their loads in registers

    def normalize(self, spec, shape):
        return normalize_fused_shape(spec, shape)

    def given(self, dims):
        batch, heads, _, length = dims
        return [batch, length, heads]

    def label(self, dims):
        batch, heads, _, length = dims
        return f"B={batch} L={length} H={heads}"

    def check_shape(self, dims):
        return fused_check_shape(dims)

    def tolerances(self, spec):
        tol = FUSED_TOL[spec.recurrence.input_dtype]
        return tol, tol

    def check(self, program, spec, dims, seed, device):
        return check_fused_program(program, spec, dims, seed, device)

    def timed(self, spec, dims, device):
        from swrgen.ops.phalanx import launch

        layout = fused_layout(dims)
        P = random_projections(spec, dims, seed=12345, device=device)
        dZ = torch.randn((dims[0], dims[3], layout.inner), device=device).to(P.dtype)
        dm = FUSED_DECAY_MAX
        return (lambda p: launch.forward(p, P, layout, dm)), (lambda p: launch.backward(p, P, dZ, layout, dm))


FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (SwrFamily(), PhalanxFamily())}


def family_for(spec: Spec) -> KernelFamily:
    """The kernels ``swrgen tune`` tunes for ``spec``: the fused Phalanx ones when it has ``fused_gating``."""
    return FAMILIES["phalanx" if spec.recurrence.fused_gating else "swr"]


def build_program(spec: Spec, cand: Mapping[str, Any]):
    """The kernel set of ``spec`` with the candidate's knobs (pinned: timed as built, plans kept)."""
    from swrgen.runtime.kernels import KernelSet
    from swrgen.runtime.program import Program

    return KernelSet(Program(spec.replace_target(**cand)), pinned=True)


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


def _direction_targets(passed: list[dict[str, Any]], best: dict[str, Any], min_gain: float) -> dict[str, Any]:
    """``{d}_target`` / ``{d}_alone_ms`` for a direction d whose fastest candidate beats the joint winner's
    time for that kernel by more than ``min_gain`` (the forward and backward launch separately, so each
    may use its own knobs; the results are identical either way)."""
    out: dict[str, Any] = {}
    for d in store.DIRECTIONS:
        fastest = min(passed, key=lambda r, col=f"{d}_ms": r[col])
        if fastest[f"{d}_ms"] < best[f"{d}_ms"] * (1 - min_gain) and fastest["target"] != best["target"]:
            out[f"{d}_target"], out[f"{d}_alone_ms"] = dict(fastest["target"]), fastest[f"{d}_ms"]
    return out


def tune(spec: Spec, shapes: Iterable[Iterable[int]], *, device: str | torch.device = "cuda",
         grid: Mapping[str, Iterable[Any]] | None = None, progress: Callable[[str], Any] | None = _print,
         rep_ms: float = 40.0, warmup_ms: float = 10.0, objective: str = "train", save: bool = True,
         directory: Any = None, min_gain: float = MIN_GAIN,
         family: KernelFamily | None = None) -> dict[str, Any]:  # fmt: skip
    """Search the tuning space of ``spec`` for each shape bucket; save and return the winners.

    family: the kernels to tune, by default :func:`family_for` (the fused Phalanx kernels of a
    ``fused_gating`` spec, else the plain SWR kernels). shapes: as that family takes them, (B, H, L)
    or (B, H, DH, L) for the plain kernels, (B, L, H) for the fused ones; shapes in one bucket are
    tuned once (the first). The spec's own target is kept unless a candidate's score is better by more
    than ``min_gain``. Returns {"spec", "family", "kernels", "arch", "nvrtc", "device", "objective",
    "timer", "candidates", "buckets": {name: {"shape" (as given), "shapes", "winner" (entry or None),
    "results" (one dict per candidate), "file"}}}.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    fam = family or family_for(spec)
    buckets: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for shape in shapes:
        dims = fam.normalize(spec, shape)
        buckets.setdefault(bucket_of(dims), []).append(dims)
    if not buckets:
        raise ValueError("no shapes to tune")
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA device (torch.cuda.is_available() is False)")

    say = progress or (lambda _msg: None)
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    arch = device_arch(spec, device)
    cands = space.candidates(spec, arch, fam.grid(spec, grid))
    timer, timer_name = make_timer(warmup_ms, rep_ms)
    device_name = torch.cuda.get_device_name(device)
    result: dict[str, Any] = {"spec": spec.name, "family": fam.name, "kernels": fam.kernels, "arch": arch,
                              "nvrtc": store.compiler_version(), "device": device_name, "objective": objective,
                              "timer": timer_name, "candidates": len(cands), "buckets": {}}  # fmt: skip
    say(f"tuning {spec.name}: {fam.name} family ({fam.title} {fam.kernels}) on {device_name} ({arch}, NVRTC "
        f"{result['nvrtc']}): {len(cands)} candidates x {len(buckets)} bucket(s), objective {objective}, "
        f"timer {timer_name}")  # fmt: skip
    baseline_key = tuple(space.current(spec)[k] for k in space.TUNABLE)
    tol_f, tol_b = fam.tolerances(spec)
    with torch.cuda.device(device), store.disabled():
        for bucket, members in buckets.items():
            shape = members[0]
            cshape = fam.check_shape(shape)
            name = bucket_name(bucket)
            others = f" (also serves {', '.join(fam.label(m) for m in members[1:])})" if len(members) > 1 else ""
            say(f"bucket {name}: timing shape {fam.label(shape)}, check shape {fam.label(cshape)}{others}")
            fwd_call, bwd_call = fam.timed(spec, shape, device)
            rows: list[dict[str, Any]] = []
            t_start = time.perf_counter()
            for i, cand in enumerate(cands, 1):
                row: dict[str, Any] = {"target": cand, "ok": False}
                label = f"[{i}/{len(cands)}] {space.describe(cand)}"
                try:
                    program = build_program(spec, cand)
                    err_f, err_b = fam.check(program, spec, cshape, seed=1000 * i + bucket[1] % 997, device=device)
                    row.update(err_fwd=err_f, err_bwd=err_b)
                    if not (err_f <= tol_f and err_b <= tol_b):
                        row["reason"] = f"wrong result: rel err fwd {err_f:.2e} (tol {tol_f}), bwd {err_b:.2e} " \
                                        f"(tol {tol_b})"  # fmt: skip
                        say(f"{label}  FAILED {row['reason']}")
                        rows.append(row)
                        continue
                    fwd = timer(lambda p=program, f=fwd_call: f(p))
                    bwd = timer(lambda p=program, f=bwd_call: f(p))
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
                             "score_ms": best["score_ms"], "objective": objective, "family": fam.name,
                             "shape": fam.given(shape), "device": device_name, "timer": timer_name,
                             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "candidates": len(rows), "failed": len(rows) - len(passed),
                             "baseline": {"target": space.current(spec),
                                          "score_ms": base["score_ms"] if base else None}}  # fmt: skip
                split = _direction_targets(passed, best, min_gain)
                entry_out.update(split)
                if save:
                    path = str(store.save(spec, arch, shape, entry_out, directory, store.device_tag(device_name)))
                gain = f", {base['score_ms'] / best['score_ms']:.2f}x vs the spec's own target" if base else ""
                say(f"bucket {name}: best {space.describe(best['target'])}  fwd {best['fwd_ms']:.4f} ms  "
                    f"bwd {best['bwd_ms']:.4f} ms{gain}; {len(rows) - len(passed)} failed"
                    + (f"; saved to {path}" if path else ""))  # fmt: skip
                for d in store.DIRECTIONS:
                    if f"{d}_target" in split:
                        say(f"bucket {name}: the {d} kernel alone is fastest with "
                            f"{space.describe(split[f'{d}_target'])} ({split[f'{d}_alone_ms']:.4f} ms); "
                            f"stored for {d}")  # fmt: skip
            else:
                say(f"bucket {name}: every candidate failed; nothing saved")
            result["buckets"][name] = {"shape": fam.given(shape), "shapes": [fam.given(m) for m in members],
                                       "winner": entry_out, "results": rows, "file": path}  # fmt: skip
            del fwd_call, bwd_call
    return result


def lookup(spec: Spec, arch: str, shape: tuple[int, int, int, int], direction: str | None = None,
           device: str | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Tuned target overrides for x.shape = [B, H, DH, L] (see :func:`swrgen.tune.store.lookup`).

    For a fused spec's Phalanx kernels: (B, H, 16, L) for P [B, L, N] of H heads. direction: "fwd" or
    "bwd" for the knobs of that kernel alone, where the tuner stored them. device: a card's
    :func:`swrgen.tune.store.device_tag`, whose own entries win.
    """
    return store.lookup(spec, arch, shape, direction, device)
