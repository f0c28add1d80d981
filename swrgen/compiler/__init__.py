"""CUDA source -> cubin through NVRTC, with an on-disk cache."""

from swrgen.compiler.cache import CompileCache, default_cache_dir
from swrgen.compiler.nvrtc import CompileError, CompileResult, ResourceUsage, compile_cubin, nvrtc_version

__all__ = [
    "CompileCache",
    "CompileError",
    "CompileResult",
    "ResourceUsage",
    "compile_cubin",
    "default_cache_dir",
    "nvrtc_version",
]
