"""CUDA source -> cubin through NVRTC, with an on-disk cache; resources read from the cubin itself."""

from swrgen.compiler.cache import CacheWarning, CompileCache, default_cache_dir
from swrgen.compiler.cubin import CubinError, KernelInfo, read_kernels
from swrgen.compiler.nvrtc import CompileError, CompileResult, ResourceUsage, compile_cubin, nvrtc_version

__all__ = [
    "CacheWarning",
    "CompileCache",
    "CompileError",
    "CompileResult",
    "CubinError",
    "KernelInfo",
    "ResourceUsage",
    "compile_cubin",
    "default_cache_dir",
    "nvrtc_version",
    "read_kernels",
]
