"""``swrgen.swr``: the SWR as a torch custom op with autograd.

CUDA tensors run the generated kernels; CPU tensors run the float64 reference (same
semantics, any floating dtype). Both ops are registered through ``torch.library``
with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them
and CUDA graphs capture them.

Inference calls (no gradient to record, not tracing) skip the dispatcher: ``swr`` and
``SwrOp`` look the call up in a plan cache keyed by everything their checks read, and a
hit allocates y and launches (small calls are launch-bound). A miss runs the checks and
fills the cache. The custom ops' CUDA bodies use plan caches too.

Saved for backward: the inputs ``a`` and ``x`` only (the backward kernel recomputes
every intermediate), so training needs no memory beyond the op's inputs and outputs.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Hashable
from pathlib import Path

import torch

from swrgen import constants
from swrgen.ops import fastpath
from swrgen.ops.fastpath import direct_ok as _direct_ok
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from swrgen.ops.swr.tiled import swr_tiled_backward
from swrgen.runtime.program import Program
from swrgen.spec import Spec, default_spec, load_spec

DEFAULT_WINDOW_BLOCKS = 2
DEFAULT_BLOCK_LEN = 16
_PROGRAMS: dict[str, Program] = {}  # op key -> compiled program (keys are plain strings for torch.library)


def _register(program: Program) -> str:
    key = hashlib.sha256((program.spec.digest() + program.source).encode()).hexdigest()[:32]
    _PROGRAMS.setdefault(key, program)
    return key


def program_for(key: str) -> Program:
    """The compiled program behind an op key (keys are what the custom ops carry)."""
    return _PROGRAMS[key]


# Plans of unpacked calls (the fast path of swr() and SwrOp, and the custom ops' CUDA bodies), keyed by
# _plan_key: the inputs' geometry plus the op key (SwrOp, custom ops) or swr()'s own arguments.
_PLANS: fastpath.Plans[tuple, launch.ForwardPlan] = fastpath.Plans(1024)
_BACKWARD_PLANS: fastpath.Plans[tuple, launch.BackwardPlan] = fastpath.Plans(1024)


def _plan_key(a: torch.Tensor, x: torch.Tensor, extra: Hashable) -> tuple:
    """Everything the input checks and a forward plan read from a and x (shapes, strides, dtypes, devices,
    whether both bases are 16-byte aligned), plus ``extra``: what else the call's result depends on."""
    return (x.shape, x.stride(), x.dtype, a.shape, a.stride(), a.dtype, x.device, a.device,
            launch.aligned(x, a), extra)  # fmt: skip


def _forward_plan(plan_key: tuple, key: str, a: torch.Tensor, x: torch.Tensor) -> launch.ForwardPlan:
    """The cached plan of an unpacked forward call of op ``key``, made (tuned program included) on a miss."""
    plan = _PLANS.get(plan_key)
    if plan is None:
        generation = fastpath.token()
        program = fastpath.resolve(_PROGRAMS[key], x.device, tuple(x.shape), "fwd")
        plan = _PLANS.put(plan_key, launch.forward_plan(program, a, x), generation)
    return plan


def _cuda_forward(a: torch.Tensor, x: torch.Tensor, key: str, cu_seqlens: torch.Tensor | None,
                  state: torch.Tensor | None, phase: int) -> torch.Tensor:  # fmt: skip
    """The generated forward: the custom op's CUDA body, and the inference path's with cu_seqlens or state."""
    if cu_seqlens is None and state is None:
        return _forward_plan(_plan_key(a, x, key), key, a, x).run(a, x)
    program = fastpath.resolve(_PROGRAMS[key], x.device, tuple(x.shape), "fwd")
    packed = None if cu_seqlens is None else launch.pack_sequences(program, cu_seqlens.tolist(), x.device)
    return launch.forward(program, a, x, packed=packed, state=state, phase=phase)


def _cuda_backward(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, key: str,
                   cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if cu_seqlens is None:
        plan_key = (_plan_key(a, x, key), dy.shape, dy.stride(), dy.dtype, launch.aligned(dy))
        plan = _BACKWARD_PLANS.get(plan_key)
        if plan is None:
            generation = fastpath.token()
            program = fastpath.resolve(_PROGRAMS[key], x.device, tuple(x.shape), "bwd")
            plan = _BACKWARD_PLANS.put(plan_key, launch.backward_plan(program, a, x, dy), generation)
        return plan.run(a, x, dy)
    program = fastpath.resolve(_PROGRAMS[key], x.device, tuple(x.shape), "bwd")
    packed = launch.pack_sequences(program, cu_seqlens.tolist(), x.device)
    return launch.backward(program, a, x, dy, packed=packed)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("swrgen::swr_fwd", mutates_args=())
def _swr_fwd(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int, key: str, out_dtype: torch.dtype,
             cu_seqlens: torch.Tensor | None = None, state: torch.Tensor | None = None,
             phase: int = 0) -> torch.Tensor:  # fmt: skip
    """cu_seqlens: int64 CPU [S+1] (packed sequences of a [1, H, DH, T] buffer); state: packed SwrState."""
    if x.is_cuda:
        return _cuda_forward(a, x, key, cu_seqlens, state, phase)
    if cu_seqlens is not None:
        from swrgen.ops.swr.varlen import swr_varlen_reference

        y = swr_varlen_reference(a, x, cu_seqlens, window_blocks, block_len)
    elif state is not None:
        from swrgen.ops.swr.state import swr_with_state

        y, _ = swr_with_state(a, x, window_blocks, block_len, _unpack_state(state, phase, window_blocks, block_len))
    else:
        y = swr_reference(a, x, window_blocks=window_blocks, block_len=block_len)
    # Contiguous like the fake below (the reference returns a strided slice when BL does not divide L).
    return y.to(out_dtype).contiguous()


@_swr_fwd.register_fake
def _(a, x, window_blocks, block_len, key, out_dtype, cu_seqlens=None, state=None, phase=0):
    return x.new_empty(x.shape, dtype=out_dtype)


def _unpack_state(packed: torch.Tensor, pos: int, window_blocks: int, block_len: int):
    """SwrState from the kernel layout [..., 2 + 2(k-1)] = (w, g, v.., P..)."""
    from swrgen.ops.swr.state import SwrState

    return SwrState.from_packed(packed, pos, block_len)


@torch.library.custom_op("swrgen::swr_bwd", mutates_args=())
def _swr_bwd(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, window_blocks: int, block_len: int, key: str,
             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if x.is_cuda:
        return _cuda_backward(a, x, dy, key, cu_seqlens)
    # A custom op runs below autograd (enable_grad records nothing here), so the CPU backward is the
    # closed-form float64 mirror of the kernel's math, per packed sequence.
    if cu_seqlens is None:
        dx, da = swr_tiled_backward(a, x, dy, window_blocks, block_len)
    else:
        bounds = cu_seqlens.tolist()
        parts = [swr_tiled_backward(a[..., s:e], x[..., s:e], dy[..., s:e], window_blocks, block_len)
                 for s, e in itertools.pairwise(bounds)]  # fmt: skip
        dx, da = torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)
    return dx.to(x.dtype).contiguous(), da.to(a.dtype).contiguous()


@_swr_bwd.register_fake
def _(a, x, dy, window_blocks, block_len, key, cu_seqlens=None):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(a, memory_format=torch.contiguous_format))  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    a, x, window_blocks, block_len, key, out_dtype, cu_seqlens, state, _phase = inputs
    ctx.save_for_backward(a, x, cu_seqlens)
    ctx.window_blocks, ctx.block_len, ctx.key, ctx.out_dtype = window_blocks, block_len, key, out_dtype
    ctx.streaming = state is not None


def _backward(ctx, dy: torch.Tensor):
    a, x, cu_seqlens = ctx.saved_tensors
    if ctx.streaming:
        raise RuntimeError("swrgen.swr with initial_state is for inference and has no backward; detach its inputs")
    # Upstream gradients may be expanded (stride 0) or of another dtype; the kernel needs unit stride along L.
    dy = dy.to(ctx.out_dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, da = _swr_bwd(a, x, dy, ctx.window_blocks, ctx.block_len, ctx.key, cu_seqlens)
    return da, dx, None, None, None, None, None, None, None


torch.library.register_autograd("swrgen::swr_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- input checks


def _check_tensors(a: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(a, torch.Tensor):
        raise TypeError(f"swr(a, x) takes tensors; got a={type(a).__name__}, x={type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, DH, L] (4 dims); got shape {tuple(x.shape)}")
    batch, heads, head_dim, length = x.shape
    per_head, per_channel = (batch, heads, length), (batch, heads, head_dim, length)
    if tuple(a.shape) not in (per_head, per_channel):
        raise ValueError(
            f"a must be [B, H, L] = {list(per_head)} (per-head gates) or [B, H, DH, L] = {list(per_channel)} "
            f"(per-channel gates) for x of shape {list(x.shape)}; got {list(a.shape)}"
        )
    if a.device != x.device:
        raise ValueError(f"a and x must be on one device; got a on {a.device}, x on {x.device}")
    for name, t in (("x", x), ("a", a)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride along L (the last dim); got strides {t.stride()}. "
                f"Call .contiguous() first."
            )


def _check_against_spec(spec: Spec, a: torch.Tensor, x: torch.Tensor) -> None:
    r = spec.recurrence
    want = {"x": (x, r.input_dtype), "a": (a, r.gate_dtype)}
    for name, (t, dtype) in want.items():
        if t.dtype != constants.torch_dtype(dtype):
            raise TypeError(
                f"{name} has dtype {t.dtype} but spec {spec.name!r} takes {constants.torch_dtype(dtype)} "
                f"(recurrence.dtypes.{'input' if name == 'x' else 'gate'})"
            )
    if x.shape[2] != r.head_dim:
        raise ValueError(f"x has head_dim {x.shape[2]} (dim 2) but spec {spec.name!r} has head_dim {r.head_dim}")
    layout = "per_channel" if a.dim() == 4 else "per_head"
    if layout != r.gate_layout:
        raise ValueError(f"a has {layout} gates (shape {list(a.shape)}) but spec {spec.name!r} has {r.gate_layout}")


# ---------------------------------------------------------------- public API


class SwrOp:
    """The compiled SWR for one spec: ``op(a, x) -> y``, differentiable."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.key = _register(program)

    @property
    def spec(self) -> Spec:
        return self.program.spec

    @property
    def source(self) -> str:
        return self.program.source

    def __call__(self, a: torch.Tensor, x: torch.Tensor, *, cu_seqlens=None, initial_state=None,
                 return_state: bool = False):  # fmt: skip
        """y = SWR(a, x); see ``swrgen.swr`` for cu_seqlens, initial_state and return_state."""
        plan_key = None
        if cu_seqlens is None and initial_state is None and not return_state and _direct_ok(a, x):
            plan_key = _plan_key(a, x, self)  # self: only calls checked against this op's spec share its plans
            plan = _PLANS.get(plan_key)
            if plan is not None:  # inputs like these passed the checks below
                return plan.run(a, x)
        _check_tensors(a, x)
        r = self.spec.recurrence
        if x.is_cuda:
            _check_against_spec(self.spec, a, x)
            out_dtype = constants.torch_dtype(r.output_dtype)
        else:  # CPU: the reference, any floating dtype; output as the spec says, float64 stays float64
            out_dtype = x.dtype if (x.dtype == torch.float64 or r.output_dtype != "fp32") else torch.float32
        if plan_key is not None:
            return _forward_plan(plan_key, self.key, a, x).run(a, x)
        return _run(a, x, r.window_blocks, r.block_len, self.key, out_dtype, cu_seqlens, initial_state, return_state)

    def __repr__(self) -> str:
        return f"SwrOp(spec={self.spec.name!r}, window_blocks={self.spec.recurrence.window_blocks})"


_OPS: dict[str, SwrOp] = {}


def load(path_or_spec: Spec | str | Path) -> SwrOp:
    """The compiled op for a Spec, a spec YAML file, or a ``swrgen build`` output folder."""
    if isinstance(path_or_spec, Spec):
        spec, program = path_or_spec, None
    else:
        path = Path(path_or_spec)
        if path.is_dir():
            from swrgen.build import load_generated

            folder = load_generated(path)
            spec = folder.spec
            program = Program(spec, source=folder.source, cubins=folder.cubins, shared_bytes=folder.shared_bytes)
        elif path.is_file():
            spec, program = load_spec(path), None
        else:
            raise FileNotFoundError(f"no spec file or generated folder at {path}")
    digest = spec.digest() if program is None else _register(program)
    if digest not in _OPS:
        _OPS[digest] = SwrOp(program or Program(spec))
    return _OPS[digest]


_DEFAULT_KEYS: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _default_key(head_dim: int, per_channel: bool, x_dtype: torch.dtype, a_dtype: torch.dtype, window_blocks: int,
                 block_len: int, out_dtype: torch.dtype, fused_gating: bool = False) -> str:  # fmt: skip
    """Op key of the default spec for these inputs: a constant to torch.compile, memoized for eager calls
    (building and hashing a spec costs more than a small launch). The memo is a plain dict: dynamo
    would trace into a functools.cache wrapper instead of treating the result as constant.
    ``fused_gating``: the spec with the fused Phalanx kernels (``swrgen.phalanx_gating``)."""
    # The types too: window_blocks=True must not be served the key of window_blocks=1 (the spec rejects bools).
    args = (head_dim, per_channel, x_dtype, a_dtype, window_blocks, block_len, out_dtype, fused_gating,
            type(window_blocks), type(block_len))  # fmt: skip
    if (key := _DEFAULT_KEYS.get(args)) is not None:
        return key
    spec = default_spec(
        head_dim=head_dim, block_len=block_len, window_blocks=window_blocks,
        gate_layout="per_channel" if per_channel else "per_head",
        input_dtype=constants.dtype_name(x_dtype), gate_dtype=constants.dtype_name(a_dtype),
        output_dtype=constants.dtype_name(out_dtype), fused_gating=fused_gating,
    )  # fmt: skip
    key = _DEFAULT_KEYS[args] = load(spec).key
    return key


def _check_cu_seqlens(cu_seqlens, x: torch.Tensor) -> torch.Tensor:
    from swrgen.ops.swr.varlen import check_cu_seqlens

    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, x must be the packed sequences as batch 1, [1, H, DH, T]; got {x.shape}")
    cu = torch.as_tensor(cu_seqlens).detach().to("cpu", torch.int64)  # host copy: the launch sizes its grid from it
    check_cu_seqlens(cu, x.shape[-1])
    return cu


def _run(a, x, k: int, bl: int, key: str, out_dtype: torch.dtype, cu_seqlens, initial_state, return_state: bool):
    """Shared tail of ``swr`` and ``SwrOp.__call__``: packed sequences and streaming state."""
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, x)
    packed_state, phase = None, 0
    if initial_state is not None:
        if cu is not None:
            raise ValueError("initial_state with cu_seqlens is not supported: stream each sequence as a batch entry")
        _check_state(initial_state, x, k, bl)
        if not x.is_cuda:  # the reference continuation keeps a float64 state exact
            from swrgen.ops.swr.state import swr_with_state

            y, new_state = swr_with_state(a, x, k, bl, initial_state)
            y = y.to(out_dtype).contiguous()
            return (y, new_state) if return_state else y
        packed_state = initial_state.packed().to(dtype=torch.float32).contiguous()
        phase = initial_state.pos % bl
    if _direct_ok(a, x) and cu is None:  # inference fast path: same kernel, no dispatcher round trip
        y = _cuda_forward(a, x, key, None, packed_state, phase)
    else:
        y = _swr_fwd(a, x, k, bl, key, out_dtype, cu, packed_state, phase)
    if not return_state:
        return y
    if cu is not None:
        raise ValueError("return_state with cu_seqlens is not supported: stream each sequence as a batch entry")
    from swrgen.ops.swr.state import final_state

    return y, final_state(a.detach(), x.detach(), k, bl, initial_state)


def _check_state(state, x: torch.Tensor, k: int, bl: int) -> None:
    from swrgen.ops.swr.state import SwrState

    if not isinstance(state, SwrState):
        raise TypeError(f"initial_state must be a swrgen SwrState; got {type(state).__name__}")
    batch, heads, head_dim, _ = x.shape
    state.check(batch, heads, head_dim, k, bl)
    if state.device != x.device:
        raise ValueError(f"initial_state is on {state.device} but the inputs are on {x.device}")


def swr(a: torch.Tensor, x: torch.Tensor, *, window_blocks: int | None = None, block_len: int | None = None,
        spec: Spec | str | Path | None = None, out_dtype: torch.dtype | None = None, cu_seqlens=None,
        initial_state=None, return_state: bool = False):  # fmt: skip
    """Sliding Window Recurrence over the jagged window of ``window_blocks`` tiles of ``block_len`` tokens.

    a: gates [B, H, L] (per head) or [B, H, DH, L] (per channel); x: inputs [B, H, DH, L].
    Returns y [B, H, DH, L]: fp32 by default (``out_dtype`` or the spec may say the input dtype).
    With ``spec`` (a Spec, YAML path or generated folder) the kernel is that spec's; the keyword
    arguments, if given, must agree with it.

    cu_seqlens: int [S+1] offsets of sequences packed in a [1, H, DH, T] buffer; tiles align to each
    sequence's start and nothing crosses a boundary (forward and backward).
    initial_state / return_state: streaming inference (``swrgen.ops.swr.state.SwrState``): continue
    from the state after ``state.pos`` tokens, and return ``(y, new_state)``. No backward.
    """
    plan_key = None
    if spec is None and cu_seqlens is None and initial_state is None and not return_state and _direct_ok(a, x):
        # The scalar arguments' types too: window_blocks=True must not be served the plan of window_blocks=1.
        args = (window_blocks, block_len, out_dtype, type(window_blocks), type(block_len))
        plan_key = _plan_key(a, x, args)
        plan = _PLANS.get(plan_key)
        if plan is not None:  # inputs and arguments like these passed the checks below
            return plan.run(a, x)
    _check_tensors(a, x)
    if spec is not None:
        op = load(spec)
        r = op.spec.recurrence
        for name, given, have in (
            ("window_blocks", window_blocks, r.window_blocks),
            ("block_len", block_len, r.block_len),
        ):
            if given is not None and given != have:
                raise ValueError(f"{name}={given} disagrees with spec {op.spec.name!r} ({name}={have})")
        if out_dtype is not None and constants.dtype_name(out_dtype) != r.output_dtype:
            raise ValueError(f"out_dtype={out_dtype} disagrees with spec {op.spec.name!r} (output {r.output_dtype})")
        return op(a, x, cu_seqlens=cu_seqlens, initial_state=initial_state, return_state=return_state)
    k = DEFAULT_WINDOW_BLOCKS if window_blocks is None else window_blocks
    bl = DEFAULT_BLOCK_LEN if block_len is None else block_len
    if not x.is_cuda:
        if not (isinstance(k, int) and k >= 1 and isinstance(bl, int) and bl >= 1):
            raise ValueError(f"window_blocks and block_len must be integers >= 1; got {k}, {bl}")
        if out_dtype is None:
            out_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return _run(a, x, k, bl, "", out_dtype, cu_seqlens, initial_state, return_state)
    if x.dtype == torch.float64:
        raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32 inputs")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    key = _default_key(x.shape[2], a.dim() == 4, x.dtype, a.dtype, k, bl, out_dtype)
    if plan_key is not None:  # an inference call that passed the checks: remember its plan
        return _forward_plan(plan_key, key, a, x).run(a, x)
    return _run(a, x, k, bl, key, out_dtype, cu_seqlens, initial_state, return_state)
