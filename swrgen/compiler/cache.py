"""On-disk cubin cache keyed by a hash of source, program name, options, NVRTC version and arch.

Entries are written to a temporary file and renamed into place, so concurrent
builds never see half an entry; each entry carries the SHA-256 of its cubin and of its
ptxas log, so a corrupt or truncated one is detected, dropped and rebuilt. A hit gets the same resource
report as a fresh compile: read from the cubin, spills from the log (``nvrtc.resources``).

The cache is only an optimisation: a folder that cannot be created, read or written (read-only, full, no
permission, a file in the way) costs a warning (CacheWarning, once per cache object) and no caching.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

from swrgen.compiler.cubin import CubinError
from swrgen.compiler.nvrtc import (
    BASE_OPTIONS,
    SOURCE_NAME,
    CompileResult,
    compile_cubin,
    nvrtc_version,
    program_name,
    resources,
)

ENV_CACHE_DIR = "SWRGEN_CACHE_DIR"
_MAGIC = b"SWRGEN-CUBIN-1\n"


class CacheWarning(UserWarning):
    """The cubin cache folder cannot be used; swrgen compiles without it."""


def default_cache_dir() -> Path:
    if env := os.environ.get(ENV_CACHE_DIR):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swrgen"


def cache_key(source: str, arch: str) -> str:
    # Everything compile_cubin passes to NVRTC but the -I path (machine-specific; it does not reach the cubin).
    h = hashlib.sha256()
    for part in (source, arch, nvrtc_version(), program_name(SOURCE_NAME), *BASE_OPTIONS):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class CompileCache:
    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.disabled_reason: str | None = None  # set when the folder could not be written: no more stores

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.cubin"

    def load(self, key: str, arch: str) -> CompileResult | None:
        """The cached result, or None when missing or damaged (a damaged entry is removed)."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except OSError:  # missing, or unreadable (permissions, a file where the folder should be): a miss
            return None
        try:
            if not blob.startswith(_MAGIC):
                raise ValueError("bad magic")
            header_end = blob.index(b"\n", len(_MAGIC))
            header = json.loads(blob[len(_MAGIC) : header_end])
            cubin = blob[header_end + 1 :]
            if len(cubin) != header["size"] or hashlib.sha256(cubin).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            log = header["log"]
            if hashlib.sha256(log.encode()).hexdigest() != header["log_sha256"]:  # the log gives the spills
                raise ValueError("log checksum mismatch")
            return CompileResult(arch=arch, cubin=cubin, log=log, resources=resources(cubin, log))
        except (ValueError, KeyError, TypeError, AttributeError, CubinError):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: the entry stays, and keeps being a miss
                pass
            return None

    def store(self, key: str, result: CompileResult) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        header = {
            "size": len(result.cubin),
            "sha256": hashlib.sha256(result.cubin).hexdigest(),
            "log": result.log,
            "log_sha256": hashlib.sha256(result.log.encode()).hexdigest(),
        }
        data = _MAGIC + json.dumps(header).encode() + b"\n" + result.cubin
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".cubin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))  # atomic: readers see the old entry or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def compile(self, source: str, arch: str) -> CompileResult:
        key = cache_key(source, arch)
        if (hit := self.load(key, arch)) is not None:
            self.hits += 1
            return hit
        self.misses += 1
        result = compile_cubin(source, arch)
        if self.disabled_reason is None:
            try:
                self.store(key, result)
            except OSError as e:
                self.disabled_reason = e.strerror or str(e)
                warnings.warn(
                    f"swrgen: cannot write the cubin cache {e.filename or self.directory}: {self.disabled_reason}; "
                    f"compiling without the cache (set {ENV_CACHE_DIR} to a writable folder to cache cubins)",
                    CacheWarning,
                    stacklevel=2,
                )
        return result
