"""Compile CUDA C++ to a cubin with NVRTC (cuda.bindings), no toolkit needed.

We always emit SASS (cubin), never PTX: a driver older than the NVRTC that made the
PTX cannot JIT it, while a cubin for the exact architecture loads anywhere.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from cuda.bindings import nvrtc

BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-lineinfo", "--extra-device-vectorization")


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message holds its log and the source lines around each error."""


@dataclass(frozen=True)
class ResourceUsage:
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


@dataclass(frozen=True)
class CompileResult:
    arch: str
    cubin: bytes
    log: str
    resources: dict[str, ResourceUsage] = field(default_factory=dict)

    def resources_json(self) -> dict[str, dict[str, int]]:
        return {name: asdict(r) for name, r in self.resources.items()}


def _check(result, prog=None, what: str = "") -> object:
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"NVRTC {what} failed: {err.name}")
    return rest[0] if len(rest) == 1 else rest


@lru_cache(maxsize=1)
def nvrtc_version() -> str:
    major, minor = _check(nvrtc.nvrtcVersion(), what="version")
    return f"{major}.{minor}"


@lru_cache(maxsize=1)
def cuda_include_dir() -> Path:
    """Headers (cuda_bf16.h, ...) from the nvidia-cuda-runtime wheel, else a CUDA toolkit."""
    candidates: list[Path] = []
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += [Path(root) / "cu13" / "include", Path(root) / "cuda_runtime" / "include"]
    except ImportError:
        pass
    candidates += [Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_bf16.h").is_file():
            return c
    raise CompileError(
        "cannot find the CUDA headers (cuda_bf16.h); install the nvidia-cuda-runtime wheel "
        "(pip install 'nvidia-cuda-runtime==13.0.*') or a CUDA toolkit at /usr/local/cuda"
    )


def compile_options(arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", *BASE_OPTIONS, f"-I{cuda_include_dir()}"]


_ERROR_LINE = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+)\): (?:error|catastrophic error)", re.M)


def _with_context(log: str, source: str, name: str, radius: int = 3) -> str:
    lines = source.splitlines()
    out = [log.rstrip()]
    for m in _ERROR_LINE.finditer(log):
        if m.group("file") != name:
            continue
        n = int(m.group("line"))
        lo, hi = max(1, n - radius), min(len(lines), n + radius)
        out.append(f"\n--- {name} lines {lo}-{hi} ---")
        out += [f"{'>' if i == n else ' '}{i:5d} | {lines[i - 1]}" for i in range(lo, hi + 1)]
    return "\n".join(out)


_FUNC = re.compile(r"Compiling entry function '(?P<name>\w+)'")
_STACK = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def parse_resources(log: str) -> dict[str, ResourceUsage]:
    """Registers, shared memory and spills per kernel, from ptxas' verbose report."""
    usage: dict[str, ResourceUsage] = {}
    current, stack = None, (0, 0, 0)
    for line in log.splitlines():
        if m := _FUNC.search(line):
            current, stack = m.group("name"), (0, 0, 0)
        elif (m := _STACK.search(line)) and current:
            stack = (int(m.group("stack")), int(m.group("st")), int(m.group("ld")))
        elif (m := _REGS.search(line)) and current:
            usage[current] = ResourceUsage(
                registers=int(m.group("regs")),
                shared_bytes=int(m.group("smem") or 0),
                stack_bytes=stack[0],
                spill_store_bytes=stack[1],
                spill_load_bytes=stack[2],
            )
    return usage


def compile_cubin(source: str, arch: str, name: str = "swr.cu") -> CompileResult:
    """Compile ``source`` for ``arch`` (e.g. "sm_90a"); raises CompileError with context."""
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), what="create")
    try:
        opts = [o.encode() for o in compile_options(arch)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), what="log size")
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(
                f"NVRTC {nvrtc_version()} could not compile {name} for {arch} ({err.name}):\n"
                + _with_context(log, source, name)
            )
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), what="cubin size")
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return CompileResult(arch=arch, cubin=bytes(cubin), log=log, resources=parse_resources(log))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
