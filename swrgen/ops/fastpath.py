"""What the public ops share to keep small calls cheap: the direct-launch test, tuned-program resolution,
and plan caches that stay valid only while the tuned-config store is unchanged.

A plan-cache key holds everything the input checks and the plan read from the call (shapes, strides,
dtypes, devices, base alignment, the scalar arguments and their types), so a hit skips the checks, the
spec and tuned-config lookups and the plan building: only what depends on global state (autograd,
tracing, torch modes) is checked per call, by ``direct_ok``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import torch

from swrgen.runtime.plan import PlanCache
from swrgen.runtime.program import Program
from swrgen.tune import store


def direct_ok(a: torch.Tensor, x: torch.Tensor) -> bool:
    """True when calling a launcher directly is indistinguishable from the custom op.

    That is: not tracing (checked first: dynamo folds it to a constant and never reaches a cache),
    plain CUDA tensors, no gradient to record, and no torch function or dispatch mode that expects to
    see the op.
    """
    return (
        not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
        and type(a) is torch.Tensor
        and x.is_cuda
        and not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad))
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
    )


_TUNED: dict[tuple, Program] = {}


def resolve(program: Program, device: torch.device, shape: tuple[int, int, int, int],
            direction: str | None = None) -> Program:  # fmt: skip
    """The program with the autotuned knobs stored for this shape (``swrgen tune``), if any.

    direction: "fwd" or "bwd", the kernel about to launch (the store may hold knobs for each alone).

    ``shape`` is what the store buckets: x's [B, H, DH, L], or (B, H, 16, L) for the fused kernels (one warp
    per head). Tuning knobs never change results (tested bitwise), so swapping them is safe; programs built
    from a generated/ folder keep that folder's source and are never swapped. Memoized by program identity
    (registered programs live as long as the process) and knobs, so no spec is hashed per call.
    """
    if not program.from_templates:
        return program
    card = store.device_tag_of(device.index) if device.index is not None else None  # a tensor's device has one
    over = store.lookup(program.spec, program.arch_for(device), shape, direction, card)
    if not over:
        return program
    key = (program, tuple(sorted(over.items())))
    tuned = _TUNED.get(key)
    if tuned is None:
        from swrgen.ops.swr.op import load  # op.py imports this module

        tuned = _TUNED[key] = load(program.spec.replace_target(**over)).program
    return tuned


_NO_CACHE = object()


def token() -> object:
    """The store's generation, read before resolving a program: a plan holds it and is stale once it differs.

    Inside ``store.disabled()`` (the tuner) lookups answer None, so nothing made there is cached.
    """
    return _NO_CACHE if store._DISABLED else store.GENERATION


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Plans(Generic[K, V]):
    """A bounded plan cache whose entries are dropped by a change of the tuned-config store
    (``store.clear_memo()``, ``store.save()``): a stale tuned program is never served."""

    def __init__(self, maxsize: int) -> None:
        self._cache: PlanCache[K, tuple[V, object]] = PlanCache(maxsize)

    def get(self, key: K) -> V | None:
        entry = self._cache.get(key)
        if entry is None or entry[1] != store.GENERATION or store._DISABLED:
            return None
        return entry[0]

    def put(self, key: K, plan: V, generation: object) -> V:
        """Remember ``plan``, made with the store at ``generation`` (``token()`` read before resolving)."""
        if generation is not _NO_CACHE:
            self._cache.put(key, (plan, generation))
        return plan

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
