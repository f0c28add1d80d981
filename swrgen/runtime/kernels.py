"""KernelSet: the one runtime object of a compiled spec, and everything that serves its calls.

Shaped like Triton's per-function ``device_caches``: a :class:`KernelSet` owns its :class:`Program`
(source and cubins), and per device a :class:`DeviceKernels` (the loaded module, its kernels by name and
the launch plans made there). Tuned variants (the same spec with other target knobs, from
``swrgen tune``) are child KernelSets, memoized on their parent. Every cache that serves a call hangs off
this object: dropping it drops them, and :meth:`KernelSet.forget_tuned` (called by the registry when the
tuned store changes) drops the plans that embed a tuned choice.

A *pinned* KernelSet never swaps in tuned knobs: tuned variants themselves, and programs read from a
``swrgen build`` folder (whose source may be hand-edited).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import torch

from swrgen.runtime.driver import Kernel, Module, ensure_context
from swrgen.runtime.plan import PlanCache
from swrgen.runtime.program import Program
from swrgen.spec import Spec
from swrgen.tune.store import STORE, TunedStore, device_tag_of

PLANS_PER_DEVICE = 1024  # launch plans kept per kernel set and device (a steady loop sees few geometries)


class DeviceKernels:
    """A KernelSet loaded on one device: arch, card, module, kernels by name, and the plans made there.

    ``plans`` maps a call's geometry (what the op's checks and the plan read from its tensors and
    arguments, plus the direction) to a plan; only the op layer that made a key reads it back.
    """

    __slots__ = ("arch", "card", "index", "kernels", "module", "multiprocessors", "plans")

    def __init__(self, program: Program, index: int) -> None:
        self.index = index
        props = torch.cuda.get_device_properties(index)
        self.arch = program.arch_for((props.major, props.minor))
        self.card = device_tag_of(index)
        self.multiprocessors = props.multi_processor_count
        ensure_context(torch.device("cuda", index))
        with torch.cuda.device(index):
            self.module = Module(program.compile(self.arch).cubin, program.kernel_names, index, program.shared_bytes)
        self.kernels: dict[str, Kernel] = self.module.kernels
        self.plans: PlanCache[tuple, Any] = PlanCache(PLANS_PER_DEVICE)


def program_key(program: Program) -> str:
    """The KernelSet's name for the custom ops (torch.library arguments are plain values)."""
    return hashlib.sha256((program.spec.digest() + program.source).encode()).hexdigest()[:32]


class KernelSet:
    """The compiled kernels of one spec (one source): per-device modules and plans, and tuned variants."""

    def __init__(self, program: Program, *, pinned: bool | None = None, store: TunedStore = STORE) -> None:
        self.program = program
        self.key = program_key(program)
        self.pinned = (not program.from_templates) if pinned is None else pinned
        self._store = store
        self._devices: dict[int, DeviceKernels] = {}
        self._variants: dict[tuple, KernelSet] = {}
        self._lock = threading.Lock()

    @property
    def spec(self) -> Spec:
        return self.program.spec

    def on(self, index: int) -> DeviceKernels:
        """This kernel set on CUDA device ``index`` (the module is loaded on first use)."""
        dev = self._devices.get(index)
        if dev is None:
            with self._lock:
                dev = self._devices.get(index)
                if dev is None:
                    dev = self._devices[index] = DeviceKernels(self.program, index)
        return dev

    def variant(self, knobs: dict[str, Any]) -> KernelSet:
        """The same spec with these target knobs (pinned; memoized here)."""
        if not knobs:
            return self
        key = tuple(sorted(knobs.items()))
        child = self._variants.get(key)
        if child is None:
            with self._lock:
                child = self._variants.get(key)
                if child is None:
                    program = Program(self.spec.replace_target(**knobs))
                    child = self._variants[key] = KernelSet(program, pinned=True, store=self._store)
        return child

    def for_shape(self, index: int, shape: tuple[int, int, int, int], direction: str) -> KernelSet:
        """The kernel set that serves a call of ``shape`` on device ``index``: the variant with the knobs
        tuned for it (``swrgen tune``; ``direction`` "fwd" or "bwd"), else this one.

        ``shape`` is what the store buckets: x's [B, H, DH, L], or (B, H, 16, L) for the fused kernels.
        Tuning knobs never change results (tested bitwise), so the swap is safe.
        """
        if self.pinned:
            return self
        dev = self.on(index)
        over = self._store.lookup(self.spec, dev.arch, shape, direction, dev.card)
        return self.variant(over) if over else self

    @property
    def caching(self) -> bool:
        """Whether plans made now may be kept: not while the tuner has the store disabled (for a kernel set
        that would otherwise swap in tuned knobs)."""
        return self.pinned or not self._store.is_disabled

    def forget_tuned(self) -> None:
        """The tuned store changed: drop the plans that may embed a tuned variant (pinned sets keep theirs)."""
        if self.pinned:
            return
        for dev in list(self._devices.values()):
            dev.plans.clear()

    def __repr__(self) -> str:
        return f"KernelSet({self.spec.name!r}, key={self.key[:8]}, pinned={self.pinned})"
