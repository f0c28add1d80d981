"""Program (spec + source) -> cubin per architecture -> module per device.

The flow mirrors cuda.core: a Program compiles to ObjectCode (a cubin, from the
disk cache or NVRTC), which is loaded once per device into a Module of Kernels.
"""

from __future__ import annotations

import threading

import torch

from swrgen.codegen import kernel_names, kernel_shared_bytes, render_source
from swrgen.compiler import CompileCache, CompileResult
from swrgen.runtime.driver import Module, ensure_context
from swrgen.spec import Spec


def native_arch(capability: tuple[int, int]) -> str:
    """The arch to compile for when a spec lists none that runs on this device."""
    major, minor = capability
    # Hopper and Blackwell datacenter parts: the "a" targets unlock their own instructions.
    return f"sm_{major}{minor}a" if (major, minor) in ((9, 0), (10, 0)) else f"sm_{major}{minor}"


def pick_arch(archs: tuple[str, ...], capability: tuple[int, int]) -> str | None:
    """The best arch in ``archs`` whose cubin runs on a device of ``capability``.

    A cubin runs on its own compute capability, and a non-"a" cubin also on later
    minors of the same major; "a" cubins run only on their exact capability.
    """
    major, minor = capability
    best, best_key = None, None
    for arch in archs:
        digits = arch.removeprefix("sm_").rstrip("a")
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        exact = (a_major, a_minor) == (major, minor)
        ok = exact or (not arch.endswith("a") and a_major == major and a_minor < minor)
        if not ok:
            continue
        key = (exact, a_minor, arch.endswith("a"))
        if best_key is None or key > best_key:
            best, best_key = arch, key
    return best


class Program:
    def __init__(self, spec: Spec, source: str | None = None, cubins: dict[str, bytes] | None = None,
                 cache: CompileCache | None = None, shared_bytes: dict[str, int] | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.from_templates = source is None  # a generated/ folder's source may be hand-edited
        self.source = source if source is not None else render_source(spec)
        # Dynamic shared memory per entry point: the source's layout (a generated folder's manifest says it).
        self.shared_bytes = dict(shared_bytes) if shared_bytes is not None else kernel_shared_bytes(spec)
        self._cubins = dict(cubins or {})
        self._cache = cache
        self._modules: dict[int, Module] = {}
        self._archs: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def cache(self) -> CompileCache:
        if self._cache is None:
            self._cache = CompileCache()
        return self._cache

    def compile(self, arch: str) -> CompileResult:
        """Cubin for ``arch`` through the disk cache (NVRTC on a miss)."""
        return self.cache.compile(self.source, arch)

    def cubin(self, arch: str) -> bytes:
        if arch not in self._cubins:
            self._cubins[arch] = self.compile(arch).cubin
        return self._cubins[arch]

    def arch_for(self, device: torch.device) -> str:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._archs:  # asked on every tuned launch: keep it off the hot path
            cap = torch.cuda.get_device_capability(index)
            self._archs[index] = pick_arch(self.spec.target.archs, cap) or native_arch(cap)
        return self._archs[index]

    def module(self, device: torch.device) -> Module:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if index not in self._modules:
                ensure_context(torch.device("cuda", index))
                with torch.cuda.device(index):
                    self._modules[index] = Module(self.cubin(self.arch_for(device)), kernel_names(self.spec), index,
                                                  self.shared_bytes)  # fmt: skip
            return self._modules[index]
