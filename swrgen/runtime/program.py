"""Program (a spec's CUDA source) -> ObjectCode (one cubin per architecture).

The flow mirrors cuda.core: a :class:`Program` compiles to :class:`ObjectCode` (from the disk cache or
NVRTC); :class:`swrgen.runtime.kernels.KernelSet` loads it per device into a module of kernels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from swrgen.codegen import kernel_names, kernel_shared_bytes, render_source
from swrgen.compiler import CompileCache
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


@dataclass(frozen=True)
class ObjectCode:
    """A cubin for one architecture."""

    arch: str
    cubin: bytes


class Program:
    """A spec's CUDA source and its cubins per architecture (compiled on first use, through the disk cache).

    ``source=None`` renders the spec's templates (``from_templates``: the tuner may swap its knobs);
    a ``swrgen build`` folder passes its own source, cubins and shared-memory layout
    (:meth:`from_generated`), which are used as they are.
    """

    def __init__(self, spec: Spec, source: str | None = None, cubins: dict[str, bytes] | None = None,
                 shared_bytes: dict[str, int] | None = None, cache: CompileCache | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.from_templates = source is None
        self.source = source if source is not None else render_source(spec)
        # Dynamic shared memory per entry point: the source's own layout (a generated folder's manifest says it).
        self.shared_bytes = dict(shared_bytes) if shared_bytes is not None else kernel_shared_bytes(spec)
        self.kernel_names = kernel_names(spec)
        self._objects = {arch: ObjectCode(arch, cubin) for arch, cubin in (cubins or {}).items()}
        self._cache = cache
        self._lock = threading.Lock()

    @classmethod
    def from_generated(cls, folder) -> Program:
        """From what ``swrgen.build.load_generated`` read (spec, source, cubins, shared_bytes)."""
        return cls(folder.spec, source=folder.source, cubins=folder.cubins, shared_bytes=folder.shared_bytes)

    def arch_for(self, capability: tuple[int, int]) -> str:
        """The arch whose cubin serves a device of ``capability``: the spec's best match, else the device's own."""
        return pick_arch(self.spec.target.archs, capability) or native_arch(capability)

    def compile(self, arch: str) -> ObjectCode:
        """The cubin for ``arch`` (memoized; the disk cache or NVRTC on first use)."""
        with self._lock:
            if arch not in self._objects:
                cache = self._cache if self._cache is not None else CompileCache()
                self._objects[arch] = ObjectCode(arch, cache.compile(self.source, arch).cubin)
            return self._objects[arch]
