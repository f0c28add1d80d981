"""``swrgen.swr``: the SWR as a torch custom op with autograd.

CUDA tensors run the generated kernels; CPU tensors run the float64 reference (same
semantics, any floating dtype). Both ops are registered through ``torch.library``
with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them
and CUDA graphs capture them.

Saved for backward: the inputs ``a`` and ``x`` only (the backward kernel recomputes
every intermediate), so training needs no memory beyond the op's inputs and outputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from swrgen import constants
from swrgen.ops.swr import launch
from swrgen.ops.swr.reference import swr_reference
from swrgen.runtime.program import Program
from swrgen.spec import Spec, default_spec, load_spec

DEFAULT_WINDOW_BLOCKS = 2
DEFAULT_BLOCK_LEN = 16
_PROGRAMS: dict[str, Program] = {}  # op key -> compiled program (keys are plain strings for torch.library)


def _register(program: Program) -> str:
    key = hashlib.sha256((program.spec.digest() + program.source).encode()).hexdigest()[:32]
    _PROGRAMS.setdefault(key, program)
    return key


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("swrgen::swr_fwd", mutates_args=())
def _swr_fwd(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int, key: str,
             out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    if x.is_cuda:
        return launch.forward(_PROGRAMS[key], a, x)
    # Contiguous like the fake below (the reference returns a strided slice when BL does not divide L).
    return swr_reference(a, x, window_blocks=window_blocks, block_len=block_len).to(out_dtype).contiguous()


@_swr_fwd.register_fake
def _(a, x, window_blocks, block_len, key, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("swrgen::swr_bwd", mutates_args=())
def _swr_bwd(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, window_blocks: int, block_len: int,
             key: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if x.is_cuda:
        return launch.backward(_PROGRAMS[key], a, x, dy)
    dx, da = _reference_backward(a, x, dy, window_blocks, block_len)
    return dx.to(x.dtype).contiguous(), da.to(a.dtype).contiguous()


@_swr_bwd.register_fake
def _(a, x, dy, window_blocks, block_len, key):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(a, memory_format=torch.contiguous_format))  # fmt: skip


def _reference_backward(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, window_blocks: int,
                        block_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, da) of ``swr_reference`` in float64 by the adjoint recurrence, without autograd.

    A custom op's kernel runs below the autograd dispatch keys, where ``torch.enable_grad()`` records no
    graph, so the CPU backward cannot call ``torch.autograd.grad`` on the reference. Same windows as the
    reference: every tile i runs ``h_j = a_j h_{j-1} + u_j`` over the k*BL padded tokens from the start of
    tile i-k+1; its adjoint is ``g_j = dy_j + a_{j+1} g_{j+1}``, giving ``du_j = g_j`` and
    ``da_j = g_j h_{j-1}``, summed over the k windows that hold each token.
    """
    k, bl = int(window_blocks), int(block_len)
    length = x.shape[-1]
    nt = -(-length // bl)
    width = k * bl
    pad = ((k - 1) * bl, nt * bl - length)
    a4 = a.unsqueeze(2) if a.dim() == 3 else a
    u_w = torch.nn.functional.pad(x.double(), pad).unfold(-1, width, bl)  # [B, H, DH, nt, k*BL]
    a_w = torch.nn.functional.pad(a4.double(), pad, value=1.0).unfold(-1, width, bl)
    dy_w = torch.nn.functional.pad(dy.double(), (0, nt * bl - length)).unfold(-1, bl, bl)  # [B, H, DH, nt, BL]
    states = []
    h = torch.zeros(u_w.shape[:-1], dtype=torch.float64, device=x.device)
    for j in range(width):
        h = a_w[..., j] * h + u_w[..., j]
        states.append(h)
    du_w = torch.zeros(u_w.shape, dtype=torch.float64, device=x.device)
    da_w = torch.zeros(u_w.shape, dtype=torch.float64, device=x.device)
    g = torch.zeros(u_w.shape[:-1], dtype=torch.float64, device=x.device)
    for j in reversed(range(width)):
        if j >= (k - 1) * bl:  # tile i's outputs are the window's last BL states
            g = g + dy_w[..., j - (k - 1) * bl]
        du_w[..., j] = g
        if j > 0:
            da_w[..., j] = g * states[j - 1]
        g = a_w[..., j] * g

    def fold(w: torch.Tensor) -> torch.Tensor:  # [..., nt, k*BL] per window -> [..., L] per token
        out = torch.zeros(*w.shape[:-2], (nt + k - 1) * bl, dtype=torch.float64, device=x.device)
        for m in range(k):  # block m of window i holds padded tokens [(i+m)*BL, (i+m+1)*BL)
            out[..., m * bl : m * bl + nt * bl] += w[..., m * bl : (m + 1) * bl].reshape(*w.shape[:-2], nt * bl)
        return out[..., (k - 1) * bl : (k - 1) * bl + length]

    da = fold(da_w)
    return fold(du_w), (da.sum(dim=2) if a.dim() == 3 else da)


def _setup_context(ctx, inputs, output) -> None:
    a, x, window_blocks, block_len, key, out_dtype = inputs
    ctx.save_for_backward(a, x)
    ctx.window_blocks, ctx.block_len, ctx.key, ctx.out_dtype = window_blocks, block_len, key, out_dtype


def _backward(ctx, dy: torch.Tensor):
    a, x = ctx.saved_tensors
    # Upstream gradients may be expanded (stride 0) or of another dtype; the kernel needs unit stride along L.
    dy = dy.to(ctx.out_dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, da = _swr_bwd(a, x, dy, ctx.window_blocks, ctx.block_len, ctx.key)
    return da, dx, None, None, None, None


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

    def __call__(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_tensors(a, x)
        r = self.spec.recurrence
        if x.is_cuda:
            _check_against_spec(self.spec, a, x)
            out_dtype = constants.torch_dtype(r.output_dtype)
        else:  # CPU: the reference, any floating dtype; output as the spec says, float64 stays float64
            out_dtype = x.dtype if (x.dtype == torch.float64 or r.output_dtype != "fp32") else torch.float32
        return _swr_fwd(a, x, r.window_blocks, r.block_len, self.key, out_dtype)

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

            program = load_generated(path)
            spec = program.spec
        elif path.is_file():
            spec, program = load_spec(path), None
        else:
            raise FileNotFoundError(f"no spec file or generated folder at {path}")
    digest = spec.digest() if program is None else _register(program)
    if digest not in _OPS:
        _OPS[digest] = SwrOp(program or Program(spec))
    return _OPS[digest]


@torch.compiler.assume_constant_result
def _default_key(head_dim: int, per_channel: bool, x_dtype: torch.dtype, a_dtype: torch.dtype, window_blocks: int,
                 block_len: int, out_dtype: torch.dtype) -> str:  # fmt: skip
    """Op key of the default spec for these inputs (a constant to torch.compile: pure Python, cached)."""
    spec = default_spec(
        head_dim=head_dim, block_len=block_len, window_blocks=window_blocks,
        gate_layout="per_channel" if per_channel else "per_head",
        input_dtype=constants.dtype_name(x_dtype), gate_dtype=constants.dtype_name(a_dtype),
        output_dtype=constants.dtype_name(out_dtype),
    )  # fmt: skip
    return load(spec).key


def swr(a: torch.Tensor, x: torch.Tensor, *, window_blocks: int | None = None, block_len: int | None = None,
        spec: Spec | str | Path | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Sliding Window Recurrence over the jagged window of ``window_blocks`` tiles of ``block_len`` tokens.

    a: gates [B, H, L] (per head) or [B, H, DH, L] (per channel); x: inputs [B, H, DH, L].
    Returns y [B, H, DH, L]: fp32 by default (``out_dtype`` or the spec may say the input dtype).
    With ``spec`` (a Spec, YAML path or generated folder) the kernel is that spec's; the keyword
    arguments, if given, must agree with it.
    """
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
        return op(a, x)
    k = DEFAULT_WINDOW_BLOCKS if window_blocks is None else window_blocks
    bl = DEFAULT_BLOCK_LEN if block_len is None else block_len
    if not x.is_cuda:
        if not (isinstance(k, int) and k >= 1 and isinstance(bl, int) and bl >= 1):
            raise ValueError(f"window_blocks and block_len must be integers >= 1; got {k}, {bl}")
        if out_dtype is None:
            out_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return _swr_fwd(a, x, k, bl, "", out_dtype)
    if x.dtype == torch.float64:
        raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32 inputs")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    key = _default_key(x.shape[2], a.dim() == 4, x.dtype, a.dtype, k, bl, out_dtype)
    return _swr_fwd(a, x, k, bl, key, out_dtype)
