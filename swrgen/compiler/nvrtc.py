"""Compile CUDA C++ to a cubin with NVRTC (cuda.bindings), no toolkit needed.

We always emit SASS (cubin), never PTX: a driver older than the NVRTC that made the
PTX cannot JIT it, while a cubin for the exact architecture loads anywhere.

Resources (registers, static shared memory, stack frame) are read from the cubin (``cubin.py``), not from
ptxas' ``-v`` log: some NVRTC builds print no report for some kernels. Only the spill bytes come from the
log, and are None where it does not give them.

Determinism: with ``-lineinfo`` ptxas writes the program's directory into the cubin's line table, and for a
relative program name (``swr.cu``) that directory is the process's working directory, so one source built
from two folders gave two cubins. Programs are therefore named by an absolute path under ``SOURCE_DIR``
(``/swrgen/swr.cu``): the line info stays (profilers map SASS to source lines; point their source lookup at
the build folder, e.g. ``generated/<name>/``) and the cubin depends only on the source, the options, NVRTC
and the arch. The include path (``-I``, inside the virtual environment) does not reach the cubin.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from cuda.bindings import nvrtc

from swrgen.compiler.cubin import CubinError, read_kernels

BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-lineinfo", "--extra-device-vectorization")
SOURCE_DIR = "/swrgen"  # the (fixed, absolute) directory the line table names; nothing is read from it
SOURCE_NAME = "swr.cu"


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message holds its log and the source lines around each error."""


@dataclass(frozen=True)
class ResourceUsage:
    """Per kernel. Registers, static shared memory (bytes per CTA) and stack frame (bytes per thread) come
    from the cubin and are always known; spill bytes only from ptxas' log: None where it does not say."""

    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int | None
    spill_load_bytes: int | None


@dataclass(frozen=True)
class CompileResult:
    arch: str
    cubin: bytes
    log: str
    resources: dict[str, ResourceUsage] = field(default_factory=dict)

    def resources_json(self) -> dict[str, dict[str, int | None]]:
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


def program_name(name: str) -> str:
    """The name NVRTC is given for ``name``: absolute, so the cubin does not record the working directory."""
    return name if name.startswith("/") else f"{SOURCE_DIR}/{name}"


_ERROR_LINE = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+)\): (?:error|catastrophic error)", re.M)


def _with_context(log: str, source: str, name: str, radius: int = 3) -> str:
    # NVRTC names the file by its program name (/swrgen/swr.cu); the message names it as the caller did.
    log = log.replace(f"{program_name(name)}(", f"{name}(")
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
_PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
_STACK = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def parse_spills(log: str) -> dict[str, tuple[int, int]]:
    """(spill store bytes, spill load bytes) per function that ptxas' ``-v`` log reports on: the line after
    its "Function properties for NAME". Functions the log does not mention are absent."""
    spills: dict[str, tuple[int, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PROPERTIES.search(line):
            current = m.group("name")
            continue
        if current and (m := _STACK.search(line)):
            spills[current] = (int(m.group("st")), int(m.group("ld")))
        current = None
    return spills


def resources(cubin: bytes, log: str) -> dict[str, ResourceUsage]:
    """The report of every kernel in ``cubin``: resources from the cubin, spills from ``log`` where it has them.

    Raises CubinError if the cubin cannot be read."""
    spills = parse_spills(log)
    return {
        name: ResourceUsage(k.registers, k.shared_bytes, k.frame_bytes, *spills.get(name, (None, None)))
        for name, k in read_kernels(cubin).items()
    }


def parse_resources(log: str) -> dict[str, ResourceUsage]:
    """ptxas' own report from its ``-v`` log (kernels with a "Used N registers" line only). The build reads the
    cubin instead (``resources``); the tests check that reader against this where the log has a report."""
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


def compile_cubin(source: str, arch: str, name: str = SOURCE_NAME) -> CompileResult:
    """Compile ``source`` for ``arch`` (e.g. "sm_90a"); raises CompileError with context.

    ``name`` is the file name errors are reported against; NVRTC gets ``program_name(name)``."""
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), program_name(name).encode(), 0, [], []), what="create")
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
        try:
            report = resources(bytes(cubin), log)
        except CubinError as e:
            raise CompileError(f"NVRTC {nvrtc_version()} made a cubin for {arch} that swrgen cannot read: {e}") from e
        return CompileResult(arch=arch, cubin=bytes(cubin), log=log, resources=report)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
