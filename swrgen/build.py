"""``swrgen build``: spec -> generated/<name>/ {swr.cu, manifest.json, swr.<arch>.cubin}.

The source and manifest are meant to be committed (a test checks they match the
templates); cubins are build outputs, rebuilt on demand through the disk cache.

A build writes nothing half-written: everything is compiled first, then each file goes to a temporary file
in the target folder and is renamed into place, ``manifest.json`` last. So a folder with a manifest has
every file that manifest names, whole, and a reader sees the old manifest or the new one. When a write
fails (full or read-only disk, no permission, a file where a folder should be) the temporary files are
removed, files already renamed are put back, and ``BuildError`` names the path, the OS error and what to
do. The cubin cache cannot fail a build (``swrgen.compiler.cache``).

This module does not import ``swrgen.runtime``: ``load_generated`` returns a ``GeneratedFolder``, from which
the runtime builds its own objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from swrgen import constants
from swrgen.codegen import kernel_names, kernel_shared_bytes, render_source
from swrgen.compiler import CompileCache, CompileResult, nvrtc_version
from swrgen.spec import Spec, SpecError, spec_from_dict

SOURCE_NAME = "swr.cu"
MANIFEST_NAME = "manifest.json"
TEMP_SUFFIX = ".swrgen-tmp"  # temporary files of a build in progress: .<name>.<random>.swrgen-tmp


class BuildError(RuntimeError):
    """A build folder could not be written, or a folder to load is not a complete build; the message names
    the path, what failed and what to do."""


def cubin_name(arch: str) -> str:
    return f"swr.{arch}.cubin"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class BuildResult:
    spec: Spec
    folder: Path
    source: str
    compiled: dict[str, CompileResult] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratedFolder:
    """What a build folder holds, checked against its manifest."""

    folder: Path
    spec: Spec
    source: str
    cubins: dict[str, bytes]  # arch -> cubin: only those that match the manifest and were built from `source`
    shared_bytes: dict[str, int]  # dynamic shared memory per entry point, as the source was rendered


def launch_geometry(spec: Spec) -> dict[str, int | bool]:
    t, r = spec.target, spec.recurrence
    return {
        "threads_per_cta": t.warps_per_cta * constants.WARP_SIZE,
        "warps_per_cta": t.warps_per_cta,
        "channels_per_warp": constants.CHANNELS_PER_WARP,
        "warps_per_head": r.head_dim // constants.CHANNELS_PER_WARP,
        "tokens_per_lane": constants.tokens_per_lane(r.block_len),
        "tiles_per_warp": t.tiles_per_warp,
        "tiles_in_flight": t.tiles_in_flight,
        "cluster_size": t.cluster_size,
        "persistent": t.persistent,
        "grid": "ceil(B*H*(DH/16) * ceil(ceil(L/block_len)/tiles_per_warp) / warps_per_cta), whole clusters",
        "staging": t.staging,
        "stages": t.stages,
        "shared_bytes": kernel_shared_bytes(spec),  # dynamic shared memory per entry point (none listed: 0)
    }


def build(spec: Spec, out_root: Path | str = "generated", archs: tuple[str, ...] | None = None,
          compile: bool = True, cache: CompileCache | None = None) -> BuildResult:  # fmt: skip
    """Render ``spec`` into ``out_root/<name>/`` and compile a cubin for each arch.

    Raises BuildError if the folder cannot be written (nothing half-written is left), CompileError if NVRTC
    rejects the source (nothing is written)."""
    archs = tuple(archs or spec.target.archs)
    out_root = Path(out_root)
    folder = out_root / spec.name
    for path in (out_root, folder):
        if path.exists() and not path.is_dir():
            raise BuildError(
                f"{path} is a file, but the build needs a folder there (the output root holds one folder per "
                "spec); choose another output folder (swrgen build -o DIR) or move the file away"
            )
    source = render_source(spec)
    result = BuildResult(spec=spec, folder=folder, source=source)
    arch_entries: dict[str, dict] = {}
    if compile:
        cache = cache or CompileCache()
        for arch in archs:  # all before anything is written: a CompileError leaves the folder as it was
            res = cache.compile(source, arch)
            result.compiled[arch] = res
            arch_entries[arch] = {
                "cubin": cubin_name(arch),
                "cubin_sha256": _sha256(res.cubin),
                "resources": res.resources_json(),  # spill fields are null where NVRTC's log does not say
            }
    result.manifest = {
        "spec": spec.to_dict(),
        "spec_digest": spec.digest(),
        "source": SOURCE_NAME,
        "source_sha256": _sha256(source.encode()),
        "kernels": list(kernel_names(spec)),
        "launch": launch_geometry(spec),
        "nvrtc_version": nvrtc_version() if compile else None,
        "archs": arch_entries,
    }
    manifest_text = json.dumps(result.manifest, indent=2, sort_keys=True) + "\n"
    files = [(SOURCE_NAME, source.encode())]
    files += [(cubin_name(arch), res.cubin) for arch, res in result.compiled.items()]
    files.append((MANIFEST_NAME, manifest_text.encode()))  # last: it vouches for the files before it
    _write_folder(folder, files)
    return result


# --- writing --------------------------------------------------------------------------------------------


def _advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space, or build into another folder (swrgen build -o DIR)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable, or build into another folder (swrgen build -o DIR)"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "a file stands where a folder is needed (or the reverse): move it away, or choose another -o DIR"
    return "check the folder, or build into another folder (swrgen build -o DIR)"


def _os_error(e: OSError, path: Path | str, what: str, note: str = "") -> BuildError:
    return BuildError(f"swrgen build could not {what} {path}: {e.strerror or e}{note}; {_advice(e)}")


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``folder/name``, flushed to disk; removed again on failure."""
    temp = folder / f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode a plain file gets (umask)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # on disk before the rename makes it visible
        finally:
            os.close(fd)
    except BaseException:
        _remove(temp)
        raise
    return temp


def _backup(target: Path) -> Path:
    """A second name for ``target`` (a hard link; a copy where links are not supported), to put it back."""
    backup = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old{TEMP_SUFFIX}")
    try:
        os.link(target, backup)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:
            shutil.copy2(target, backup)
        except BaseException:
            _remove(backup)
            raise
    return backup


def _remove(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _write_folder(folder: Path, files: list[tuple[str, bytes]]) -> None:
    """Put ``files`` (name, bytes) into ``folder``, in order, each whole or not at all; on any OSError the
    folder is left as it was and BuildError is raised."""
    created = not folder.is_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise _os_error(e, e.filename or folder, "create the folder") from e
    temps: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    replaced: list[str] = []
    step = ("write", folder)
    try:
        for name, data in files:
            step = ("write", folder / name)
            temps[name] = _write_temp(folder, name, data)
        for name, _ in files[:-1]:  # the manifest, last, needs no backup: nothing comes after it
            if (folder / name).exists():
                step = ("keep a copy of", folder / name)
                backups[name] = _backup(folder / name)
        for name, _ in files:
            step = ("rename a temporary file onto", folder / name)
            os.replace(temps[name], folder / name)
            del temps[name]
            replaced.append(name)
    except OSError as e:
        restored = True
        for name in reversed(replaced):  # put the folder back as it was
            try:
                if name in backups:
                    os.replace(backups.pop(name), folder / name)
                else:
                    os.unlink(folder / name)
            except OSError:
                restored = False
        for path in [*temps.values(), *backups.values()]:
            restored &= _remove(path)
        if created and restored:
            try:
                os.rmdir(folder)  # the folder this build made, empty again
            except OSError:
                pass
        note = "" if restored else f" (and {folder} could not be put back as it was: delete it and build again)"
        raise _os_error(e, step[1], step[0], note) from e
    for path in backups.values():
        _remove(path)


# --- reading --------------------------------------------------------------------------------------------


def _rebuild_hint(folder: Path) -> str:
    return f"rebuild it with `swrgen build SPEC -o {folder.parent}`"


def _shape_error(path: Path, field_name: str, expected: str, got: object) -> BuildError:
    return BuildError(f"{path}: {field_name} should be {expected}, got {type(got).__name__}; "
                      f"the manifest is damaged or not from this swrgen: {_rebuild_hint(path.parent)}")  # fmt: skip


def _plain_name(path: Path, field_name: str, value: object) -> str:
    if not isinstance(value, str) or not value or Path(value).name != value:
        raise BuildError(f"{path}: {field_name} should name a file in the folder, got {value!r}; "
                         f"{_rebuild_hint(path.parent)}")  # fmt: skip
    return value


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"{folder} is not a swrgen build folder: it has no {MANIFEST_NAME}; "
                         "run `swrgen build SPEC -o DIR` first and load DIR/<spec name>") from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BuildError(f"cannot read {path}: {reason}; check the file, or {_rebuild_hint(folder)}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BuildError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): damaged or "
                         f"cut short; {_rebuild_hint(folder)}") from None  # fmt: skip
    if not isinstance(manifest, dict):
        raise _shape_error(path, "the manifest", "a JSON object", manifest)
    for key, kind, expected in (("spec", dict, "an object"), ("source", str, "a file name"),
                                ("source_sha256", str, "a hex digest"), ("archs", dict, "an object"),
                                ("launch", dict, "an object")):  # fmt: skip
        if key not in manifest:
            raise BuildError(f"{path} has no {key!r}; the manifest is damaged or not from this swrgen: "
                             f"{_rebuild_hint(folder)}")  # fmt: skip
        if not isinstance(manifest[key], kind):
            raise _shape_error(path, repr(key), expected, manifest[key])
    shared = manifest["launch"].get("shared_bytes")
    if not isinstance(shared, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in shared.items()
    ):
        raise _shape_error(path, "'launch.shared_bytes'", "an object of kernel name -> bytes", shared)
    for arch, entry in manifest["archs"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("cubin_sha256"), str):
            raise _shape_error(path, f"'archs.{arch}'", "an object with 'cubin' and 'cubin_sha256'", entry)
        _plain_name(path, f"'archs.{arch}.cubin'", entry.get("cubin"))
    _plain_name(path, "'source'", manifest["source"])
    return manifest


def load_generated(folder: Path | str) -> GeneratedFolder:
    """What a build folder holds. Cubins are used only if they match the manifest and the source they were
    built from (a hand-edited source is used without them); missing ones are simply left out.

    Raises BuildError, naming the file, for a missing, unreadable or damaged manifest or a missing source."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    manifest_path = folder / MANIFEST_NAME
    try:
        spec = spec_from_dict(manifest["spec"], source=str(manifest_path))
    except SpecError as e:
        raise BuildError(f"{manifest_path}: the recorded spec is not valid for this swrgen ({e}); "
                         f"{_rebuild_hint(folder)}") from e  # fmt: skip
    source_path = folder / manifest["source"]
    try:
        source = source_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"{source_path} is missing (the manifest beside it names it); "
                         f"{_rebuild_hint(folder)}") from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BuildError(f"cannot read {source_path}: {reason}; {_rebuild_hint(folder)}") from e
    cubins: dict[str, bytes] = {}
    if _sha256(source.encode()) == manifest["source_sha256"]:
        for arch, entry in manifest["archs"].items():
            try:
                data = (folder / entry["cubin"]).read_bytes()
            except OSError:  # cubins are build outputs (not committed): the runtime compiles what is missing
                continue
            if _sha256(data) == entry["cubin_sha256"]:
                cubins[arch] = data
    # The source's own shared-memory layout (rendered with the constants of its day), not today's.
    return GeneratedFolder(folder=folder, spec=spec, source=source, cubins=cubins,
                           shared_bytes=dict(manifest["launch"]["shared_bytes"]))  # fmt: skip
