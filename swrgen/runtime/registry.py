"""The registry of live kernel sets: what a custom op's key names, and the default spec of a call.

torch.library ops take plain values, so an op call carries its KernelSet's key (a string); the registry
answers it. Kernel sets are held weakly by key (an op object keeps its own alive), except the defaults,
which ``swrgen.swr`` and ``swrgen.phalanx_gating`` build from their arguments and keep for the process.
It also remembers the calls without a state (inference and training, dense or packed with host-int
offsets) that passed the public ops' checks (``calls``), and the packed layouts (``cu_seqlens`` given as
host values) that did (``layouts``). The registry listens to the tuned store: a change drops the calls and
makes every kernel set drop its tuned plans.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable
from typing import Any

from swrgen.runtime.kernels import KernelSet, program_key
from swrgen.runtime.plan import PlanCache
from swrgen.runtime.program import Program
from swrgen.spec import Spec, default_spec
from swrgen.tune.store import STORE

CALLS = 1024  # validated calls remembered
LAYOUTS = 256  # validated packed layouts remembered


class Registry:
    def __init__(self) -> None:
        self._by_key: weakref.WeakValueDictionary[str, KernelSet] = weakref.WeakValueDictionary()
        self._defaults: dict[Hashable, KernelSet] = {}
        self._lock = threading.Lock()
        # Calls without a state that passed the public ops' checks, by everything those checks read (the
        # tensors' geometry, the arguments, a packed call's offsets and stream): a hit skips the checks, the
        # spec and tuned lookups and the plan.
        self.calls: PlanCache[tuple, Any] = PlanCache(CALLS)
        # Packed layouts that passed the checks, by their offsets: each layer of a step and each step that
        # repeats the layout reuses one checked object and its device copies (no check, no upload).
        self.layouts: PlanCache[tuple, Any] = PlanCache(LAYOUTS)
        STORE.subscribe(self.forget_tuned)

    def add(self, program: Program) -> KernelSet:
        """The live KernelSet of ``program``'s spec and source (a new one if none is alive)."""
        key = program_key(program)
        with self._lock:
            ks = self._by_key.get(key)
            if ks is None:
                ks = self._by_key[key] = KernelSet(program)
        return ks

    def spec(self, spec: Spec) -> KernelSet:
        """The live KernelSet of ``spec`` rendered from the templates."""
        return self.add(Program(spec))

    def get(self, key: str) -> KernelSet:
        ks = self._by_key.get(key)
        if ks is None:
            raise KeyError(f"no live swrgen kernel set has key {key!r}: the op that made it was released")
        return ks

    def default(self, **recurrence) -> KernelSet:
        """The KernelSet of the default spec for these recurrence fields (kept for the process).

        The key carries each value's type, so ``window_blocks=True`` is never served ``window_blocks=1``'s
        set (the spec rejects bools)."""
        memo_key = tuple(sorted((k, type(v), v) for k, v in recurrence.items()))
        ks = self._defaults.get(memo_key)
        if ks is None:
            ks = self.spec(default_spec(**recurrence))
            with self._lock:
                ks = self._defaults.setdefault(memo_key, ks)
        return ks

    def forget_tuned(self) -> None:
        self.calls.clear()
        for ks in list(self._by_key.values()):
            ks.forget_tuned()

    def live(self) -> list[KernelSet]:
        """Every live kernel set (introspection and tests)."""
        return list(self._by_key.values())


REGISTRY = Registry()
