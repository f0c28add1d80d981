"""``swrgen.build``: cubins that do not depend on where the build runs, a folder that is never left
half-written (full or read-only disks, files in the way), a cubin cache that cannot fail a build, and
``load_generated``'s checks of a build folder."""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import swrgen.build as build_module
from swrgen.build import MANIFEST_NAME, SOURCE_NAME, TEMP_SUFFIX, BuildError, GeneratedFolder, build, load_generated
from swrgen.codegen import kernel_shared_bytes
from swrgen.compiler import CacheWarning, CompileCache, nvrtc
from swrgen.spec import SPECS_DIR, load_spec

SPEC = load_spec(SPECS_DIR / "hopper_k1.yaml")
ARCHS = ("sm_80",)  # one arch keeps these tests quick; the session cache serves repeated builds
skip_if_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                  reason="root writes into read-only folders")  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file in ``folder`` (None: no folder)."""
    if not folder.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob(f"*{TEMP_SUFFIX}"))


# --- the same cubins wherever the build runs ------------------------------------------------------------


def test_build_is_byte_identical_from_two_working_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two "clones": different working directories, each with its own (empty) cubin cache so both really
    # compile, and the second with its CUDA headers at another path (its own virtual environment).
    spec = load_spec(SPECS_DIR / "hopper_k2.yaml")
    folders = []
    for i, cwd in enumerate([tmp_path / "clone_a", tmp_path / "clone_b" / "somewhere" / "deeper"]):
        cwd.mkdir(parents=True)
        monkeypatch.chdir(cwd)
        if i == 1:
            (tmp_path / "headers").symlink_to(nvrtc.cuda_include_dir(), target_is_directory=True)
            monkeypatch.setattr(nvrtc, "cuda_include_dir", lambda: tmp_path / "headers")
        cache = CompileCache(tmp_path / f"cache_{i}")
        folders.append(build(spec, "generated", archs=("sm_90a", "sm_80"), cache=cache).folder.resolve())
        assert (cache.misses, cache.hits) == (2, 0)
    a, b = (snapshot(f) for f in folders)
    assert a is not None and sorted(a) == sorted(b) == [MANIFEST_NAME, SOURCE_NAME, "swr.sm_80.cubin",
                                                          "swr.sm_90a.cubin"]  # fmt: skip
    for name in a:
        assert a[name] == b[name], f"{name} differs between the two working directories"
    cubin = a["swr.sm_90a.cubin"]
    assert b"/swrgen" in cubin and b"swr.cu" in cubin, "the line table (-lineinfo) is gone"
    assert str(tmp_path).encode() not in cubin


# --- output paths that cannot work ----------------------------------------------------------------------


def _no_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "render_source", lambda spec: pytest.fail("rendered before the path check"))


def test_out_root_naming_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").write_text("mine")
    _no_compiling(monkeypatch)
    with pytest.raises(BuildError, match=rf"{tmp_path / 'out'} is a file.*-o DIR"):
        build(SPEC, tmp_path / "out", archs=ARCHS)
    assert snapshot(tmp_path) == {"out": b"mine"}


def test_spec_folder_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / SPEC.name).write_text("mine")
    _no_compiling(monkeypatch)
    with pytest.raises(BuildError, match=rf"{tmp_path / SPEC.name} is a file"):
        build(SPEC, tmp_path, archs=ARCHS)
    assert snapshot(tmp_path) == {SPEC.name: b"mine"}


def test_out_root_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(BuildError, match=r"could not create the folder .*file.*Not a directory.*a file stands"):
        build(SPEC, tmp_path / "file" / "sub", archs=ARCHS)
    assert snapshot(tmp_path) == {"file": b"mine"}


# --- a disk that fails at any step ----------------------------------------------------------------------


class FailingOs:
    """``os`` for swrgen.build whose ``fail_at``-th fallible call raises OSError(code); a failing write first
    writes half of its data, as a full disk does."""

    FALLIBLE = frozenset({"makedirs", "open", "write", "fsync", "link", "replace", "rmdir"})

    def __init__(self, fail_at: int, code: int = errno.ENOSPC) -> None:
        self.fail_at, self.code, self.calls = fail_at, code, 0

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in self.FALLIBLE:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                if name == "write":
                    real(args[0], bytes(args[1][: len(args[1]) // 2]))
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)

        return call


def _changed_source(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = build_module.render_source
    monkeypatch.setattr(build_module, "render_source", lambda spec: rendered(spec) + "\n// the next build\n")


def _fail_each_step(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object], check_failed: Callable[[str], None],
                    code: int = errno.ENOSPC) -> int:  # fmt: skip
    """Run ``run`` with the 1st, 2nd, ... fallible OS call failing until it succeeds; returns the steps."""
    step = 0
    while True:
        step += 1
        failing = FailingOs(step, code)
        monkeypatch.setattr(build_module, "os", failing)
        try:
            run()
        except BuildError as e:
            check_failed(str(e))
            continue
        finally:
            monkeypatch.setattr(build_module, "os", os)
        assert failing.calls < step, "succeeded although a call failed"
        return step


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "existing_folder"])
def test_full_disk_at_each_step_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            existing: bool) -> None:  # fmt: skip
    out = tmp_path / "out"
    folder = out / SPEC.name
    archs = ARCHS
    if existing:  # a complete folder; the next build changes swr.cu and the manifest and adds a cubin
        build(SPEC, out, archs=ARCHS)
        _changed_source(monkeypatch)
        archs = (*ARCHS, "sm_90a")
    before = snapshot(folder)
    wanted = snapshot(build(SPEC, tmp_path / "reference", archs=archs).folder)
    assert wanted != before

    def check_failed(message: str) -> None:
        assert "No space left on device" in message and str(folder) in message, message
        assert "free some disk space" in message, message
        assert snapshot(folder) == before, "the folder was changed by a failed build"
        assert leftovers(tmp_path) == []

    steps = _fail_each_step(monkeypatch, lambda: build(SPEC, out, archs=archs), check_failed)
    assert steps >= (16 if existing else 10), "fewer steps than files to write: the test is not failing them"
    assert snapshot(folder) == wanted
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read_only_fs", "permission"])
def test_unwritable_disk_at_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    build(SPEC, tmp_path, archs=ARCHS)
    before = snapshot(tmp_path / SPEC.name)
    _changed_source(monkeypatch)

    def check_failed(message: str) -> None:
        assert os.strerror(code) in message and "make the folder writable" in message, message
        assert snapshot(tmp_path / SPEC.name) == before
        assert leftovers(tmp_path) == []

    _fail_each_step(monkeypatch, lambda: build(SPEC, tmp_path, archs=ARCHS), check_failed, code)


@skip_if_root
def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = build(SPEC, tmp_path, archs=ARCHS).folder
    before = snapshot(folder)
    _changed_source(monkeypatch)
    folder.chmod(0o555)
    try:
        with pytest.raises(BuildError, match=rf"could not write {folder / SOURCE_NAME}: Permission denied"):
            build(SPEC, tmp_path, archs=ARCHS)
        assert snapshot(folder) == before and leftovers(tmp_path) == []
    finally:
        folder.chmod(0o755)
    (tmp_path / "ro_root").mkdir(mode=0o555)
    with pytest.raises(BuildError, match=r"could not create the folder .*ro_root.*Permission denied"):
        build(SPEC, tmp_path / "ro_root", archs=ARCHS)


def test_manifest_is_replaced_not_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader that opened the manifest during a rebuild keeps reading the old file whole.
    folder = build(SPEC, tmp_path, archs=ARCHS).folder
    with open(folder / MANIFEST_NAME, "rb") as reader:
        _changed_source(monkeypatch)
        build(SPEC, tmp_path, archs=ARCHS)
        old = json.loads(reader.read())
    new = json.loads((folder / MANIFEST_NAME).read_text())
    assert old["source_sha256"] != new["source_sha256"]


# --- the cubin cache is only an optimisation ------------------------------------------------------------

TINY = 'extern "C" __global__ void tiny(float* out) { out[threadIdx.x] = 2.0f; }\n'


def test_unusable_cache_does_not_fail_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "render_source", lambda spec: TINY)  # compiles in milliseconds
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build(SPEC, tmp_path / "out", archs=("sm_80", "sm_90a"), cache=CompileCache(tmp_path / "cache"))
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1 and str(tmp_path / "cache") in messages[0], messages  # once, with the path
    assert sorted(snapshot(result.folder)) == [MANIFEST_NAME, SOURCE_NAME, "swr.sm_80.cubin", "swr.sm_90a.cubin"]
    assert load_generated(result.folder).cubins.keys() == {"sm_80", "sm_90a"}


def test_report_with_unknown_spills_reaches_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An NVRTC that prints no ptxas report: the manifest records the resources, and null spills.
    compile_cubin = nvrtc.compile_cubin

    def silent(source: str, arch: str):
        result = compile_cubin(source, arch)
        return dataclasses.replace(result, log="", resources=nvrtc.resources(result.cubin, ""))

    monkeypatch.setattr("swrgen.compiler.cache.compile_cubin", silent)
    monkeypatch.setattr(build_module, "render_source", lambda spec: TINY)
    folder = build(SPEC, tmp_path, archs=ARCHS, cache=CompileCache(tmp_path / "cache")).folder
    usage = json.loads((folder / MANIFEST_NAME).read_text())["archs"]["sm_80"]["resources"]["tiny"]
    assert usage["registers"] > 0 and usage["shared_bytes"] == 0 and usage["stack_bytes"] == 0
    assert usage["spill_store_bytes"] is None and usage["spill_load_bytes"] is None


# --- reading a build folder -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(SPEC, tmp_path_factory.mktemp("built"), archs=ARCHS).folder


@pytest.fixture
def folder(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / built.name))


def test_load_generated(folder: Path) -> None:
    got = load_generated(folder)
    assert isinstance(got, GeneratedFolder)
    assert got.folder == folder and got.spec == SPEC
    assert got.source == (folder / SOURCE_NAME).read_text()
    assert got.cubins == {"sm_80": (folder / "swr.sm_80.cubin").read_bytes()}
    assert got.shared_bytes == kernel_shared_bytes(SPEC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.source = ""  # type: ignore[misc]


def test_load_generated_skips_cubins_it_cannot_trust(folder: Path) -> None:
    (folder / "swr.sm_80.cubin").write_bytes(b"\x7fELF damaged")
    assert load_generated(folder).cubins == {}
    (folder / "swr.sm_80.cubin").unlink()  # cubins are not committed: a clone has none
    assert load_generated(folder).cubins == {}


def test_load_generated_hand_edited_source_drops_the_cubins(folder: Path, built: Path) -> None:
    (folder / SOURCE_NAME).write_text((folder / SOURCE_NAME).read_text() + "// edited\n")
    got = load_generated(folder)
    assert got.source.endswith("// edited\n") and got.cubins == {}


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit the manifest in place (what ``edit`` returns is ignored)."""

    def apply(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        edit(manifest)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))

    return apply


def _write_manifest(text: str | Callable[[str], str]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        old = (folder / MANIFEST_NAME).read_text()
        (folder / MANIFEST_NAME).write_text(text(old) if callable(text) else text)

    return apply


DAMAGED: dict[str, tuple[Callable[[Path], None], str, str]] = {  # how, the file named, what the message says
    "no_manifest": (lambda f: (f / MANIFEST_NAME).unlink(), "", "is not a swrgen build folder: it has no manifest"),
    "empty_manifest": (_write_manifest(""), MANIFEST_NAME, "is not valid JSON"),
    "half_a_manifest": (_write_manifest(lambda t: t[: len(t) // 2]), MANIFEST_NAME, "is not valid JSON"),
    "manifest_not_utf8": (lambda f: (f / MANIFEST_NAME).write_bytes(b"\xff\xfe{}"), MANIFEST_NAME, "cannot read"),
    "manifest_a_list": (_write_manifest("[]"), MANIFEST_NAME, "the manifest should be a JSON object, got list"),
    "no_spec": (_edit_manifest(lambda m: m.pop("spec")), MANIFEST_NAME, "has no 'spec'"),
    "no_archs": (_edit_manifest(lambda m: m.pop("archs")), MANIFEST_NAME, "has no 'archs'"),
    "no_launch": (_edit_manifest(lambda m: m.pop("launch")), MANIFEST_NAME, "has no 'launch'"),
    "no_source_digest": (_edit_manifest(lambda m: m.pop("source_sha256")), MANIFEST_NAME, "has no 'source_sha256'"),
    "spec_a_number": (_edit_manifest(lambda m: m.update(spec=3)), MANIFEST_NAME, "'spec' should be an object"),
    "no_shared_bytes": (_edit_manifest(lambda m: m["launch"].pop("shared_bytes")), MANIFEST_NAME,
                        "'launch.shared_bytes' should be an object"),
    "shared_bytes_text": (_edit_manifest(lambda m: m["launch"].update(shared_bytes={"swr_fwd_vec": "1"})),
                          MANIFEST_NAME, "'launch.shared_bytes' should be"),
    "arch_entry_a_string": (_edit_manifest(lambda m: m["archs"].update(sm_80="swr.sm_80.cubin")), MANIFEST_NAME,
                            "'archs.sm_80' should be an object"),
    "cubin_outside": (_edit_manifest(lambda m: m["archs"]["sm_80"].update(cubin="../swr.sm_80.cubin")),
                      MANIFEST_NAME, "'archs.sm_80.cubin' should name a file in the folder"),
    "source_outside": (_edit_manifest(lambda m: m.update(source="/etc/passwd")), MANIFEST_NAME,
                       "'source' should name a file in the folder"),
    "invalid_spec": (_edit_manifest(lambda m: m["spec"]["recurrence"].update(window_blocks=99)), MANIFEST_NAME,
                     "the recorded spec is not valid"),
    "no_source": (lambda f: (f / SOURCE_NAME).unlink(), SOURCE_NAME, "is missing"),
}  # fmt: skip


@pytest.mark.parametrize("how", sorted(DAMAGED))
def test_load_generated_damaged_folder(folder: Path, how: str) -> None:
    damage, file_name, message = DAMAGED[how]
    damage(folder)
    with pytest.raises(BuildError) as info:
        load_generated(folder)
    text = str(info.value)
    assert str(folder / file_name) in text and message in text, text
    assert "swrgen build" in text, "the message should say what to do"


def test_build_module_does_not_import_the_runtime() -> None:
    # The runtime is redesigned separately; it builds its objects from GeneratedFolder.
    tree = ast.parse(Path(build_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith("swrgen.runtime")}
