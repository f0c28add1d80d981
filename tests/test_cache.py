"""The on-disk cubin cache: hits and misses, keys, damaged entries, concurrent writers, its location."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from swrgen.compiler import CacheWarning, CompileCache, compile_cubin, default_cache_dir, read_kernels
from swrgen.compiler import cache as cache_module
from swrgen.compiler.cache import cache_key
from swrgen.compiler.nvrtc import resources

# A tiny kernel compiles in a few ms; the concurrency test uses a real rendered spec (slower, wider race).
SOURCE = r"""
extern "C" __global__ void probe(float* out, const float* in, int n) {
  __shared__ float buf[128];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? in[i] : 0.0f;
  __syncthreads();
  if (i < n) out[i] = buf[127 - threadIdx.x] * 2.0f;
}
"""
ARCH = "sm_80"


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.cubin"))


def forbid_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("NVRTC was called on what should be a cache hit")

    monkeypatch.setattr(cache_module, "compile_cubin", fail)


# --- hits and misses ------------------------------------------------------------------------------------


def test_miss_then_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CompileCache(tmp_path)
    first = cache.compile(SOURCE, ARCH)
    assert (cache.misses, cache.hits) == (1, 0)
    assert first.cubin[:4] == b"\x7fELF"
    assert first.resources["probe"].shared_bytes == 512
    assert first.resources["probe"].registers == read_kernels(first.cubin)["probe"].registers > 0
    assert entries(tmp_path) == [cache.path(cache_key(SOURCE, ARCH))]

    forbid_compiling(monkeypatch)
    second = cache.compile(SOURCE, ARCH)
    assert (cache.misses, cache.hits) == (1, 1)
    assert (second.arch, second.cubin, second.log, second.resources) == (
        first.arch,
        first.cubin,
        first.log,
        first.resources,
    )
    # A new cache object on the same folder (another process, a later session) hits too.
    other = CompileCache(tmp_path)
    assert other.compile(SOURCE, ARCH).cubin == first.cubin
    assert (other.misses, other.hits) == (0, 1)
    assert not list(tmp_path.glob(".tmp-*")), "temporary files left behind"


def test_hit_equals_fresh_compile(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.compile(SOURCE, ARCH)
    hit = cache.compile(SOURCE, ARCH)
    fresh = compile_cubin(SOURCE, ARCH)
    assert hit.cubin == fresh.cubin
    assert hit.resources == fresh.resources


def test_hit_has_the_full_report_when_the_log_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An NVRTC that prints no ptxas report: the entry still gives registers, shared memory and stack (from the
    # cubin), and spills are unknown (None) rather than 0.
    def silent_compile(source: str, arch: str):
        result = compile_cubin(source, arch)
        return replace(result, log="", resources=resources(result.cubin, ""))

    monkeypatch.setattr(cache_module, "compile_cubin", silent_compile)
    cache = CompileCache(tmp_path)
    fresh = cache.compile(SOURCE, ARCH)
    hit = CompileCache(tmp_path).load(cache_key(SOURCE, ARCH), ARCH)
    assert hit is not None and hit.log == "" and hit.resources == fresh.resources
    usage = hit.resources["probe"]
    assert usage.registers > 0 and usage.shared_bytes == 512 and usage.stack_bytes == 0
    assert usage.spill_store_bytes is None and usage.spill_load_bytes is None


def test_key_depends_on_source_arch_and_nvrtc(monkeypatch: pytest.MonkeyPatch) -> None:
    key = cache_key(SOURCE, ARCH)
    assert key == cache_key(SOURCE, ARCH)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(SOURCE + "\n", ARCH) != key
    assert cache_key(SOURCE.replace("2.0f", "3.0f"), ARCH) != key
    assert cache_key(SOURCE, "sm_90a") != key
    # No ambiguity from concatenation: (source, arch) pairs that join to the same text differ.
    assert cache_key("ab", "c") != cache_key("a", "bc")
    monkeypatch.setattr(cache_module, "nvrtc_version", lambda: "99.9")
    assert cache_key(SOURCE, ARCH) != key
    monkeypatch.undo()
    # The compile options and the program name (it is in the cubin's line table) are part of the key.
    monkeypatch.setattr(cache_module, "BASE_OPTIONS", (*cache_module.BASE_OPTIONS, "-DX"))
    assert cache_key(SOURCE, ARCH) != key
    monkeypatch.undo()
    monkeypatch.setattr(cache_module, "program_name", lambda name: f"/elsewhere/{name}")
    assert cache_key(SOURCE, ARCH) != key


def test_each_arch_and_source_gets_its_own_entry(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    a80 = cache.compile(SOURCE, "sm_80")
    a90 = cache.compile(SOURCE, "sm_90a")
    changed = cache.compile(SOURCE.replace("2.0f", "3.0f"), "sm_80")
    assert (cache.misses, cache.hits) == (3, 0)
    assert len(entries(tmp_path)) == 3
    assert a80.cubin != a90.cubin and a80.cubin != changed.cubin
    assert cache.compile(SOURCE, "sm_90a").cubin == a90.cubin
    assert cache.compile(SOURCE, "sm_80").cubin == a80.cubin
    assert (cache.misses, cache.hits) == (3, 2)


# --- damaged entries ------------------------------------------------------------------------------------


def _flip(offset_of):
    def corrupt(blob: bytes) -> bytes:
        i = offset_of(blob)
        return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]

    return corrupt


def _header_end(blob: bytes) -> int:
    return blob.index(b"\n", len(cache_module._MAGIC))


def _with_header(edit):
    """Replace the JSON header by ``edit(header)``: well-formed JSON, wrong content."""

    def corrupt(blob: bytes) -> bytes:
        end = _header_end(blob)
        header = json.loads(blob[len(cache_module._MAGIC) : end])
        return cache_module._MAGIC + json.dumps(edit(header)).encode() + blob[end:]

    return corrupt


def _with_cubin(edit):
    """Replace the cubin by ``edit(cubin)`` and fix the header's size and checksum: only the ELF is wrong."""

    def corrupt(blob: bytes) -> bytes:
        end = _header_end(blob)
        header = json.loads(blob[len(cache_module._MAGIC) : end])
        cubin = edit(blob[end + 1 :])
        header = {**header, "size": len(cubin), "sha256": hashlib.sha256(cubin).hexdigest()}
        return cache_module._MAGIC + json.dumps(header).encode() + b"\n" + cubin

    return corrupt


def _log_value_at(blob: bytes) -> int:
    """Offset of the first character of the header's "log" value (its closing quote when the log is empty)."""
    return blob.index(b'"log": "') + len(b'"log": "')


CORRUPTIONS = {
    "header_not_a_mapping": _with_header(lambda h: [h]),
    "header_log_not_a_string": _with_header(lambda h: {**h, "log": 7}),
    "header_size_not_a_number": _with_header(lambda h: {**h, "size": str(h["size"])}),
    "header_without_log_checksum": _with_header(lambda h: {k: v for k, v in h.items() if k != "log_sha256"}),
    "header_log_edited": _with_header(lambda h: {**h, "log": h["log"] + "ptxas info : 1 bytes spill stores"}),
    "cubin_not_an_elf": _with_cubin(lambda c: b"not a cubin" * 100),
    "cubin_for_another_machine": _with_cubin(lambda c: c[:18] + (62).to_bytes(2, "little") + c[20:]),
    "cubin_cut_short": _with_cubin(lambda c: c[: len(c) // 2]),
    "flip_magic": _flip(lambda b: 3),
    "flip_header_size": _flip(lambda b: b.index(b'"size"') + 9),
    "flip_header_sha": _flip(lambda b: b.index(b'"sha256"') + 12),
    "flip_header_log": _flip(_log_value_at),
    "flip_header_log_sha": _flip(lambda b: b.index(b'"log_sha256"') + 16),
    "flip_header_newline": _flip(_header_end),
    "flip_cubin_first": _flip(lambda b: _header_end(b) + 1),
    "flip_cubin_middle": _flip(lambda b: (_header_end(b) + len(b)) // 2),
    "flip_cubin_last": _flip(lambda b: len(b) - 1),
    "truncate_cubin": lambda b: b[:-100],
    "truncate_cubin_one": lambda b: b[:-1],
    "truncate_in_header": lambda b: b[: _header_end(b) - 10],
    "truncate_to_magic": lambda b: b[: len(cache_module._MAGIC)],
    "empty": lambda b: b"",
    "appended": lambda b: b + b"\0",
    "garbage": lambda b: os.urandom(len(b)),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_damaged_entry_is_detected_removed_and_rebuilt(tmp_path: Path, how: str) -> None:
    cache = CompileCache(tmp_path)
    good = cache.compile(SOURCE, ARCH)
    key = cache_key(SOURCE, ARCH)
    path = cache.path(key)
    blob = path.read_bytes()
    damaged = CORRUPTIONS[how](blob)
    assert damaged != blob
    path.write_bytes(damaged)

    assert cache.load(key, ARCH) is None, "a damaged entry was served"
    assert not path.exists(), "a damaged entry was left in place"

    path.write_bytes(damaged)
    rebuilt = cache.compile(SOURCE, ARCH)
    assert (cache.misses, cache.hits) == (2, 0)
    assert rebuilt.cubin == good.cubin and rebuilt.resources == good.resources
    assert cache.load(key, ARCH) is not None, "the rebuilt entry is not valid"
    assert cache.compile(SOURCE, ARCH).cubin == good.cubin
    assert cache.hits == 1


def test_failed_store_leaves_no_entry_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CompileCache(tmp_path)
    result = compile_cubin(SOURCE, ARCH)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        cache.store(cache_key(SOURCE, ARCH), result)
    assert list(tmp_path.iterdir()) == []


# --- a cache folder that cannot be written: compile anyway, warn once, do not cache -------------------------


def _compile_twice_expecting_one_warning(cache: CompileCache) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cache.compile(SOURCE, ARCH)
        second = cache.compile(SOURCE, ARCH)
    assert first.cubin == second.cubin == compile_cubin(SOURCE, ARCH).cubin
    assert (cache.misses, cache.hits) == (2, 0), "nothing should have been cached"
    ours = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    return ours


def test_cache_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("not a folder")
    cache = CompileCache(tmp_path / "cache")
    (warning,) = _compile_twice_expecting_one_warning(cache)
    assert str(tmp_path / "cache") in str(warning.message) and "SWRGEN_CACHE_DIR" in str(warning.message)
    assert cache.disabled_reason
    assert (tmp_path / "cache").read_text() == "not a folder"


def test_cache_folder_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(cache_module.os, "replace", disk_full)
    cache = CompileCache(tmp_path)
    (warning,) = _compile_twice_expecting_one_warning(cache)
    assert "No space left on device" in str(warning.message) and str(tmp_path) in str(warning.message)
    assert list(tmp_path.iterdir()) == [], "a temporary file or entry was left behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_cache_folder_read_only(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    key = cache_key(SOURCE, ARCH)
    made_elsewhere = CompileCache(tmp_path / "rw")
    good = made_elsewhere.compile(SOURCE, ARCH)
    CompileCache(directory).path(key).write_bytes(made_elsewhere.path(key).read_bytes())
    directory.chmod(0o555)
    try:
        hit = CompileCache(directory).compile(SOURCE, ARCH)  # a read-only cache still serves its entries
        assert hit.cubin == good.cubin
        other = SOURCE.replace("2.0f", "3.0f")
        cache = CompileCache(directory)
        with pytest.warns(CacheWarning, match="Permission denied"):
            cache.compile(other, ARCH)
        assert cache.misses == 1 and len(entries(directory)) == 1
    finally:
        directory.chmod(0o755)


def test_cache_dir_is_created_on_first_store(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    cache = CompileCache(directory)
    assert cache.load(cache_key(SOURCE, ARCH), ARCH) is None  # a missing folder is just a miss
    cache.compile(SOURCE, ARCH)
    assert len(entries(directory)) == 1


# --- concurrent writers ---------------------------------------------------------------------------------


def _compile_in_child(directory: str, source: str, arch: str, barrier, results) -> None:
    from swrgen.compiler import CompileCache

    cache = CompileCache(directory)
    barrier.wait(timeout=120)  # both processes look up the empty cache at the same time
    try:
        result = cache.compile(source, arch)
        results.put(("ok", os.getpid(), cache.misses, cache.hits, result.cubin))
    except BaseException as e:  # report, so the parent can fail with the child's error
        results.put(("error", os.getpid(), repr(e), 0, b""))


def test_concurrent_compiles_of_one_source(tmp_path: Path) -> None:
    from swrgen.codegen import render_source
    from swrgen.spec import SPECS_DIR, load_spec

    source = render_source(load_spec(SPECS_DIR / "hopper_k2.yaml"))  # ~1 s to compile: a wide race window
    arch = "sm_90a"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_compile_in_child, args=(str(tmp_path), source, arch, barrier, results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert [g[0] for g in got] == ["ok", "ok"], got
    cubins = {g[4] for g in got}
    assert len(cubins) == 1, "the two processes got different cubins"
    (cubin,) = cubins
    assert cubin[:4] == b"\x7fELF"
    # Exactly one entry, whole and valid, and no temporary file left by either writer.
    assert [p.name for p in tmp_path.iterdir()] == [f"{cache_key(source, arch)}.cubin"]
    cache = CompileCache(tmp_path)
    hit = cache.load(cache_key(source, arch), arch)
    assert hit is not None and hit.cubin == cubin


# --- location -------------------------------------------------------------------------------------------


def test_session_uses_a_temporary_cache(session_cache_dir: Path) -> None:
    assert default_cache_dir() == session_cache_dir
    assert CompileCache().directory == session_cache_dir


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    cache = CompileCache()
    assert cache.directory == tmp_path / "mine"
    cache.compile(SOURCE, ARCH)
    assert len(entries(tmp_path / "mine")) == 1
    assert not (tmp_path / "xdg").exists()


def test_default_cache_dir_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWRGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "swrgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "swrgen"
    monkeypatch.setenv("SWRGEN_CACHE_DIR", "")  # empty means unset
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "swrgen"
