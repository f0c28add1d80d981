"""The committed generated/<name>/{swr.cu, manifest.json} are current: they match the specs and templates.

Cubins are build outputs (gitignored) and are not checked here; the manifest records what they were built
from. After editing a template or a spec, regenerate with ``swrgen build specs/<file>`` for each spec.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import REPO, SPEC_PATHS

from swrgen.codegen import kernel_names, render_source
from swrgen.spec import load_spec

GENERATED = REPO / "generated"


def regenerate_hint(path) -> str:
    return f"generated/ is stale: run `swrgen build specs/{path.name}` (from the repository root) to regenerate"


@pytest.mark.parametrize("path", SPEC_PATHS, ids=[p.stem for p in SPEC_PATHS])
def test_generated_source_is_current(path) -> None:
    spec = load_spec(path)
    source_file = GENERATED / spec.name / "swr.cu"
    assert source_file.is_file(), f"{source_file.relative_to(REPO)} is missing; " + regenerate_hint(path)
    assert source_file.read_text() == render_source(spec), (
        f"{source_file.relative_to(REPO)} differs from the rendered templates; " + regenerate_hint(path)
    )


@pytest.mark.parametrize("path", SPEC_PATHS, ids=[p.stem for p in SPEC_PATHS])
def test_generated_manifest_is_current(path) -> None:
    spec = load_spec(path)
    manifest_file = GENERATED / spec.name / "manifest.json"
    hint = regenerate_hint(path)
    assert manifest_file.is_file(), f"{manifest_file.relative_to(REPO)} is missing; " + hint
    manifest = json.loads(manifest_file.read_text())
    assert manifest["spec_digest"] == spec.digest(), f"{manifest_file.relative_to(REPO)}: spec changed; " + hint
    assert manifest["spec"] == spec.to_dict(), hint
    source = (GENERATED / spec.name / "swr.cu").read_bytes()
    assert manifest["source_sha256"] == hashlib.sha256(source).hexdigest(), (
        "manifest.json was not written with this swr.cu; " + hint
    )
    assert manifest["kernels"] == list(kernel_names(spec)), hint
    # Built with compilation (not --no-compile), for exactly the spec's archs: the manifest records resources.
    assert sorted(manifest["archs"]) == sorted(spec.target.archs), hint
    for arch, entry in manifest["archs"].items():
        assert sorted(entry["resources"]) == sorted(kernel_names(spec)), f"{arch}: " + hint
        for kernel, usage in entry["resources"].items():
            assert_usage(usage, f"{arch} {kernel}: " + hint)


def assert_usage(usage: dict, hint: str) -> None:
    """One kernel's resources as the manifest records them: from the cubin, spills null where unknown."""
    assert set(usage) == {"registers", "shared_bytes", "stack_bytes", "spill_store_bytes", "spill_load_bytes"}, hint
    assert isinstance(usage["registers"], int) and 0 < usage["registers"] <= 255, hint
    assert isinstance(usage["shared_bytes"], int) and usage["shared_bytes"] >= 0, hint
    assert isinstance(usage["stack_bytes"], int) and usage["stack_bytes"] >= 0, hint
    for key in ("spill_store_bytes", "spill_load_bytes"):  # null: NVRTC's log did not say (never a made-up 0)
        assert usage[key] is None or (isinstance(usage[key], int) and usage[key] >= 0), hint


def test_assert_usage_accepts_unknown_spills_only() -> None:
    known = {"registers": 96, "shared_bytes": 0, "stack_bytes": 8, "spill_store_bytes": 4, "spill_load_bytes": 4}
    assert_usage(known, "")
    assert_usage({**known, "spill_store_bytes": None, "spill_load_bytes": None}, "")
    bad_ones = [
        {**known, "registers": None},
        {**known, "stack_bytes": None},
        {**known, "spill_load_bytes": -1},
        {**known, "spill_store_bytes": "4"},
        {k: v for k, v in known.items() if k != "spill_load_bytes"},
    ]
    for bad in bad_ones:
        with pytest.raises(AssertionError):
            assert_usage(bad, "")


def test_no_orphaned_generated_folders() -> None:
    names = {load_spec(p).name for p in SPEC_PATHS}
    folders = {p.name for p in GENERATED.iterdir() if p.is_dir()}
    orphans = sorted(folders - names)
    assert not orphans, f"generated/ has folders for no spec in specs/: {orphans}; delete them"
