"""``swrgen.phalanx_gating``: the fused Phalanx gating + SWR as a torch custom op with autograd.

CUDA tensors run the spec's ``phalanx_fwd`` / ``phalanx_bwd`` kernels (``fused_gating: true``);
CPU tensors run the reference (``reference.py``), float64 stays float64. Saved for backward: P only;
the backward kernel recomputes the gates, the forward scan and y.
"""

from __future__ import annotations

from pathlib import Path

import torch

from swrgen import constants
from swrgen.ops import fastpath
from swrgen.ops.phalanx import launch
from swrgen.ops.phalanx.layout import GatingLayout
from swrgen.ops.phalanx.reference import phalanx_gating_backward, phalanx_gating_reference
from swrgen.ops.swr.op import _default_key, load, program_for
from swrgen.spec import Spec


def _resolve(key: str, P: torch.Tensor, layout: GatingLayout, direction: str):
    """The op's program with the knobs tuned for this shape and direction ("fwd" or "bwd"): the fused
    kernels run one warp per head, so the store buckets them as (B, H, head_dim, L)."""
    shape = (P.shape[0], layout.heads, layout.head_dim, P.shape[1])
    return fastpath.resolve(program_for(key), P.device, shape, direction)


# Plans of the fused calls, keyed by P's geometry plus the op key and arguments (custom-op bodies) or
# phalanx_gating's own arguments (its inference fast path); dropped when the tuned-config store changes.
_PLANS: fastpath.Plans[tuple, launch.ForwardPlan] = fastpath.Plans(1024)
_BACKWARD_PLANS: fastpath.Plans[tuple, launch.BackwardPlan] = fastpath.Plans(1024)


def _geometry(P: torch.Tensor) -> tuple:
    """What the checks and a plan read from P: shape, strides, dtype, device, whether its base is 16-byte aligned."""
    return (P.shape, P.stride(), P.dtype, P.device, launch.aligned(P))


def _forward_plan(plan_key: tuple, key: str, P: torch.Tensor, layout: GatingLayout,
                  decay_max: float) -> launch.ForwardPlan:  # fmt: skip
    plan = _PLANS.get(plan_key)
    if plan is None:
        generation = fastpath.token()
        program = _resolve(key, P, layout, "fwd")
        plan = _PLANS.put(plan_key, launch.forward_plan(program, P, layout, decay_max), generation)
    return plan


def _cuda_forward(P: torch.Tensor, layout: GatingLayout, decay_max: float, key: str) -> torch.Tensor:
    return _forward_plan((_geometry(P), layout, decay_max, key), key, P, layout, decay_max).run(P)


def _cuda_backward(P: torch.Tensor, dZ: torch.Tensor, layout: GatingLayout, decay_max: float, key: str) -> torch.Tensor:
    if dZ.stride(-1) != 1:
        dZ = dZ.contiguous()
    plan_key = (_geometry(P), _geometry(dZ), layout, decay_max, key)
    plan = _BACKWARD_PLANS.get(plan_key)
    if plan is None:
        generation = fastpath.token()
        program = _resolve(key, P, layout, "bwd")
        plan = _BACKWARD_PLANS.put(plan_key, launch.backward_plan(program, P, dZ, layout, decay_max), generation)
    return plan.run(P, dZ)


@torch.library.custom_op("swrgen::phalanx_fwd", mutates_args=())
def _phalanx_fwd(P: torch.Tensor, heads: int, kv_heads: int, head_dim: int, window_blocks: int, block_len: int,
                 decay_max: float, key: str) -> torch.Tensor:  # fmt: skip
    layout = GatingLayout(heads, kv_heads, head_dim)
    if P.is_cuda:
        return _cuda_forward(P, layout, decay_max, key)
    return phalanx_gating_reference(P, layout, window_blocks, block_len, decay_max).to(P.dtype)


@_phalanx_fwd.register_fake
def _(P, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, key):
    return P.new_empty((P.shape[0], P.shape[1], heads * head_dim))


@torch.library.custom_op("swrgen::phalanx_bwd", mutates_args=())
def _phalanx_bwd(P: torch.Tensor, dZ: torch.Tensor, heads: int, kv_heads: int, head_dim: int, window_blocks: int,
                 block_len: int, decay_max: float, key: str) -> torch.Tensor:  # fmt: skip
    layout = GatingLayout(heads, kv_heads, head_dim)
    if P.is_cuda:
        return _cuda_backward(P, dZ, layout, decay_max, key)
    return phalanx_gating_backward(P, dZ, layout, window_blocks, block_len, decay_max).to(P.dtype)


@_phalanx_bwd.register_fake
def _(P, dZ, heads, kv_heads, head_dim, window_blocks, block_len, decay_max, key):
    return torch.empty_like(P, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    P, *ctx.args = inputs
    ctx.save_for_backward(P)


def _backward(ctx, dZ: torch.Tensor):
    (P,) = ctx.saved_tensors
    dZ = dZ.to(P.dtype)
    if dZ.stride(-1) != 1:  # e.g. an expanded gradient
        dZ = dZ.contiguous()
    return (_phalanx_bwd(P, dZ, *ctx.args),) + (None,) * len(ctx.args)


torch.library.register_autograd("swrgen::phalanx_fwd", _backward, setup_context=_setup_context)


def _check(P: object, layout: GatingLayout, decay_max: object) -> None:
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P must be a tensor; got {type(P).__name__}")
    if P.dim() != 3 or P.shape[-1] != layout.width:
        raise ValueError(
            f"P must be the projections [B, L, N] with N = H + 2*KVH*DH + H*DH = {layout.width} "
            f"(heads={layout.heads}, kv_heads={layout.kv_heads}, head_dim={layout.head_dim}); got {list(P.shape)}"
        )
    if P.shape[1] < 1:
        raise ValueError("P must hold at least one token (L >= 1)")
    if not P.is_floating_point():
        raise TypeError(f"P must be a floating-point tensor; got {P.dtype}")
    if P.stride(-1) != 1:
        raise ValueError(f"P must have unit stride along its last dim; got strides {P.stride()}. Call .contiguous().")
    if isinstance(decay_max, bool) or not isinstance(decay_max, (int, float)) or not 0 < decay_max <= 1:
        raise ValueError(f"decay_max must be a number in (0, 1]; got {decay_max!r}")


def _spec_key(spec: Spec | str | Path, P: torch.Tensor, layout: GatingLayout, k: int, bl: int) -> str:
    op = load(spec)
    r = op.spec.recurrence
    if not r.fused_gating:
        raise ValueError(f"spec {op.spec.name!r} has no fused Phalanx kernels (recurrence.fused_gating is false)")
    for name, given, have in (("window_blocks", k, r.window_blocks), ("block_len", bl, r.block_len),
                              ("head_dim", layout.head_dim, r.head_dim)):  # fmt: skip
        if given != have:
            raise ValueError(f"{name}={given} disagrees with spec {op.spec.name!r} ({name}={have})")
    if P.is_cuda and P.dtype != constants.torch_dtype(r.input_dtype):
        raise TypeError(f"P has dtype {P.dtype} but spec {op.spec.name!r} takes {constants.torch_dtype(r.input_dtype)}")
    return op.key


def phalanx_gating(P: torch.Tensor, *, heads: int, kv_heads: int | None = None, head_dim: int = 16,
                   window_blocks: int = 2, block_len: int = 16, decay_max: float = 0.8,
                   spec: Spec | str | Path | None = None) -> torch.Tensor:  # fmt: skip
    """Z [B, L, H*DH] from the Phalanx projections P [B, L, H + 2*KVH*DH + H*DH] (columns A | B | C | V):

        a = decay_max * sigmoid(P_A),  y = SWR(a, sigmoid(P_B) * P_V),  Z = y * P_C + P_V

    B and C are shared by the heads of a kv-group (head h reads kv-head h // (H // KVH)). On CUDA one
    generated kernel does all of it (and one the backward); ``spec`` picks a fused spec, else the default
    one for P's dtype. Z has P's dtype.
    """
    plan_key = None
    direct = fastpath.direct_ok(P, P)  # inference: the launcher directly, no dispatcher round trip
    if direct and spec is None:
        # The scalar arguments' types too: heads=True or heads=2.0 must not be served the plan of heads=1 or 2.
        args = (heads, kv_heads, head_dim, window_blocks, block_len, decay_max, type(heads), type(kv_heads),
                type(head_dim), type(window_blocks), type(block_len), type(decay_max))  # fmt: skip
        plan_key = (_geometry(P), args)
        plan = _PLANS.get(plan_key)
        if plan is not None:  # P and arguments like these passed the checks below
            return plan.run(P)
    layout = GatingLayout(heads, heads if kv_heads is None else kv_heads, head_dim)
    _check(P, layout, decay_max)
    k, bl, dm = window_blocks, block_len, float(decay_max)
    if spec is not None:
        key = _spec_key(spec, P, layout, k, bl)
    elif P.is_cuda:
        if P.dtype == torch.float64:
            raise TypeError("float64 runs on the CPU only; the CUDA kernels take bfloat16, float16 or float32")
        key = _default_key(head_dim, False, P.dtype, P.dtype, k, bl, P.dtype, fused_gating=True)
    else:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (k, bl)):
            raise ValueError(f"window_blocks and block_len must be integers >= 1; got {k!r}, {bl!r}")
        key = ""
    if direct:  # the checks passed: remember the plan under phalanx_gating's arguments (or the spec's op key)
        return _forward_plan(plan_key or (_geometry(P), layout, dm, key), key, P, layout, dm).run(P)
    return _phalanx_fwd(P, layout.heads, layout.kv_heads, head_dim, k, bl, dm, key)
