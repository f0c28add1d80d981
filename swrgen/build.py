"""``swrgen build``: spec -> generated/<name>/ {swr.cu, manifest.json, swr.<arch>.cubin}.

The source and manifest are meant to be committed (a test checks they match the
templates); cubins are build outputs, rebuilt on demand through the disk cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from swrgen import constants
from swrgen.codegen import kernel_names, kernel_shared_bytes, render_source
from swrgen.compiler import CompileCache, CompileResult, nvrtc_version
from swrgen.runtime.program import Program
from swrgen.spec import Spec, spec_from_dict

SOURCE_NAME = "swr.cu"
MANIFEST_NAME = "manifest.json"


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
    """Render ``spec`` into ``out_root/<name>/`` and compile a cubin for each arch."""
    archs = tuple(archs or spec.target.archs)
    folder = Path(out_root) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    source = render_source(spec)
    (folder / SOURCE_NAME).write_text(source)
    result = BuildResult(spec=spec, folder=folder, source=source)
    arch_entries: dict[str, dict] = {}
    if compile:
        cache = cache or CompileCache()
        for arch in archs:
            res = cache.compile(source, arch)
            (folder / cubin_name(arch)).write_bytes(res.cubin)
            result.compiled[arch] = res
            arch_entries[arch] = {
                "cubin": cubin_name(arch),
                "cubin_sha256": _sha256(res.cubin),
                "resources": res.resources_json(),
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
    (folder / MANIFEST_NAME).write_text(json.dumps(result.manifest, indent=2, sort_keys=True) + "\n")
    return result


def load_generated(folder: Path | str) -> Program:
    """A Program from a build folder; cubins are used only if they match the source they were built from."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a swrgen build folder (no {MANIFEST_NAME}); run `swrgen build` first")
    manifest = json.loads(manifest_path.read_text())
    spec = spec_from_dict(manifest["spec"], source=str(manifest_path))
    source = (folder / manifest.get("source", SOURCE_NAME)).read_text()
    cubins: dict[str, bytes] = {}
    if _sha256(source.encode()) == manifest.get("source_sha256"):
        for arch, entry in manifest.get("archs", {}).items():
            path = folder / entry["cubin"]
            if path.is_file() and _sha256(data := path.read_bytes()) == entry["cubin_sha256"]:
                cubins[arch] = data
    # The source's own shared-memory layout (rendered with the constants of its day), not today's.
    shared = manifest.get("launch", {}).get("shared_bytes")
    return Program(spec, source=source, cubins=cubins, shared_bytes=shared)
