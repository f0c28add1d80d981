"""The ``swrgen`` command line (click), run in-process with CliRunner."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import SPEC_PATHS, SPECS_DIR

from swrgen import cli
from swrgen.build import BuildError, load_generated
from swrgen.codegen import kernel_names, render_source
from swrgen.compiler import cache as cache_module
from swrgen.spec import Target, load_spec

COMMANDS = ("bench", "build", "demo", "list", "show", "tune", "validate")


def run(*args: str):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def spec_path(stem: str) -> Path:
    return SPECS_DIR / f"{stem}.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_SPEC = """\
name: bad_window
recurrence:
  head_dim: 16
  window_blocks: 9
"""


# --- help, version --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_commands(flag: str) -> None:
    result = run(flag)
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    listed = sorted(line.split()[0] for line in commands.strip().splitlines())
    assert listed == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert f"Usage: main {command}" in result.output or f"{command} [OPTIONS]" in result.output


def test_runs_as_a_module() -> None:
    """``python -m swrgen`` is the same command line (for machines where the script is not on PATH)."""
    out = subprocess.run([sys.executable, "-m", "swrgen", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == run("list").output


def test_version() -> None:
    import importlib.metadata

    import swrgen

    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"swrgen, version {swrgen.__version__}\n"
    try:  # installed (editable or not): the metadata's version, which pyproject.toml reads from swrgen/__init__.py
        assert swrgen.__version__ == importlib.metadata.version("swrgen") == swrgen._VERSION
    except importlib.metadata.PackageNotFoundError:
        assert swrgen.__version__ == swrgen._VERSION


def test_unknown_command() -> None:
    result = run("frobnicate")
    assert result.exit_code == 2
    assert "No such command" in result.output


# --- validate -------------------------------------------------------------------------------------------


def test_validate_all_shipped_specs() -> None:
    result = run("validate", *SPEC_PATHS)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(SPEC_PATHS)
    for line, path in zip(lines, SPEC_PATHS, strict=True):
        spec = load_spec(path)
        assert line.startswith("ok") and str(path) in line
        assert spec.name in line and spec.digest()[:12] in line


def test_validate_bad_spec_names_file_line_and_field(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    result = run("validate", bad)
    assert result.exit_code == 1
    assert f"{bad}:4: recurrence.window_blocks" in result.stderr  # window_blocks is on line 4
    assert "allowed: 1..8" in result.stderr
    assert result.stdout == ""


def test_validate_mixed_reports_every_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", BAD_SPEC)
    typo = write(tmp_path, "typo.yaml", "name: t\ntarget:\n  warps_per_cat: 4\n")
    good = spec_path("hopper_k2")
    result = run("validate", bad, good, typo)
    assert result.exit_code == 1
    assert f"ok    {good}" in result.stdout
    assert f"{bad}:4: recurrence.window_blocks" in result.stderr
    assert f"{typo}:3: target.warps_per_cat" in result.stderr
    assert "did you mean 'warps_per_cta'" in result.stderr


def test_validate_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_validate_needs_an_argument() -> None:
    assert run("validate").exit_code == 2


# --- list, show -----------------------------------------------------------------------------------------


def test_list_shipped_specs() -> None:
    result = run("list")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in SPEC_PATHS]
    k3 = next(line for line in lines if line.startswith("hopper_k3.yaml"))
    assert "k=3" in k3 and "archs=sm_90a,sm_100a" in k3
    cluster = next(line for line in lines if line.startswith("hopper_k2_cluster.yaml"))
    assert "cluster=2" in cluster
    assert "bf16->bf16" in next(line for line in lines if line.startswith("hopper_k2_bf16out.yaml"))


def test_list_folder_with_an_invalid_spec(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", BAD_SPEC)
    write(tmp_path, "good.yml", "name: good\n")
    write(tmp_path, "notes.txt", "not a spec\n")
    result = run("list", tmp_path)
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bad.yaml") and "INVALID" in lines[0] and "9" in lines[0]
    assert lines[1].startswith("good.yml") and "k=2 bl=16 dh=16 bf16->fp32" in lines[1]


def test_show_fills_in_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "tiny.yaml", "name: tiny\nrecurrence: {window_blocks: 3}\n")
    result = run("show", path)
    assert result.exit_code == 0
    first, _, body = result.output.partition("\n")
    spec = load_spec(path)
    assert first == f"# {path}  digest {spec.digest()}"
    shown = yaml.safe_load(body)
    assert shown == spec.to_dict()
    assert shown["recurrence"]["window_blocks"] == 3
    assert shown["recurrence"]["dtypes"] == {"input": "bf16", "gate": "bf16", "output": "fp32", "accum": "fp32"}
    defaults = Target()
    assert shown["target"]["tiles_per_warp"] == defaults.tiles_per_warp
    assert shown["target"]["archs"] == list(defaults.archs)
    # The printed YAML is itself a valid spec with the same digest.
    again = write(tmp_path, "again.yaml", body)
    assert load_spec(again).digest() == spec.digest()


def test_show_source() -> None:
    path = spec_path("hopper_k3")
    result = run("show", "--source", path)
    assert result.exit_code == 0
    assert result.output == render_source(load_spec(path))


def test_show_bad_spec(tmp_path: Path) -> None:
    result = run("show", write(tmp_path, "bad.yaml", BAD_SPEC))
    assert result.exit_code == 1
    assert "recurrence.window_blocks" in result.output and ":4:" in result.output


# --- build ----------------------------------------------------------------------------------------------


def check_build_folder(folder: Path, spec_file: Path, archs: tuple[str, ...]) -> dict:
    spec = load_spec(spec_file)
    source = (folder / "swr.cu").read_text()
    assert source == render_source(spec)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["spec_digest"] == spec.digest()
    assert manifest["spec"] == spec.to_dict()
    assert manifest["source_sha256"] == hashlib.sha256(source.encode()).hexdigest()
    assert manifest["kernels"] == list(kernel_names(spec))
    assert manifest["launch"]["threads_per_cta"] == 32 * spec.target.warps_per_cta
    assert sorted(manifest["archs"]) == sorted(archs)
    for arch in archs:
        entry = manifest["archs"][arch]
        cubin = (folder / entry["cubin"]).read_bytes()
        assert entry["cubin"] == f"swr.{arch}.cubin"
        assert cubin[:4] == b"\x7fELF"
        assert entry["cubin_sha256"] == hashlib.sha256(cubin).hexdigest()
        assert sorted(entry["resources"]) == sorted(kernel_names(spec))
        for usage in entry["resources"].values():
            assert usage["registers"] > 0
            assert set(usage) == {"registers", "shared_bytes", "stack_bytes", "spill_store_bytes", "spill_load_bytes"}
    assert sorted(p.name for p in folder.glob("*.cubin")) == sorted(f"swr.{a}.cubin" for a in archs)
    return manifest


def test_build_spec_archs(tmp_path: Path) -> None:
    spec_file = spec_path("hopper_k1")
    result = run("build", spec_file, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "hopper_k1"
    manifest = check_build_folder(folder, spec_file, ("sm_90a", "sm_100a"))
    assert manifest["nvrtc_version"].startswith("13.")
    assert f"wrote {folder}/swr.cu" in result.output
    for arch in ("sm_90a", "sm_100a"):
        assert f"  {arch}: " in result.output
    assert "swr_fwd_vec: " in result.output and " regs, " in result.output


def test_build_arch_override_and_reuse_through_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file = spec_path("hopper_k1")
    archs = ("sm_80", "sm_120")
    result = run("build", spec_file, "-o", tmp_path, "--arch", archs[0], "--arch", archs[1])
    assert result.exit_code == 0, result.output
    check_build_folder(tmp_path / "hopper_k1", spec_file, archs)

    # A second build of the same source is served from the (session) disk cache: no NVRTC call.
    def fail(*args, **kwargs):
        raise AssertionError("NVRTC called although the cache holds these cubins")

    monkeypatch.setattr(cache_module, "compile_cubin", fail)
    again = run("build", spec_file, "-o", tmp_path / "again", "--arch", archs[0], "--arch", archs[1])
    assert again.exit_code == 0, again.output
    for arch in archs:
        name = f"swr.{arch}.cubin"
        assert (tmp_path / "again" / "hopper_k1" / name).read_bytes() == (tmp_path / "hopper_k1" / name).read_bytes()


@pytest.mark.parametrize(
    ("spec_stem", "arch", "fragment"),
    [
        ("hopper_k1", "sm_81", "'sm_81'; allowed: sm_80"),
        ("hopper_k1", "90a", "'90a'"),
        ("hopper_k2_cluster", "sm_80", "sm_80 has no clusters"),
    ],
)
def test_build_bad_arch(tmp_path: Path, spec_stem: str, arch: str, fragment: str) -> None:
    result = run("build", spec_path(spec_stem), "-o", tmp_path, "--arch", arch)
    assert result.exit_code == 2
    assert "Invalid value for --arch" in result.output and fragment in result.output
    assert list(tmp_path.iterdir()) == [], "a rejected build wrote files"


def test_build_no_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "compile_cubin", lambda *a, **k: pytest.fail("--no-compile compiled"))
    spec_file = spec_path("hopper_k2_bf16out")
    result = run("build", spec_file, "-o", tmp_path, "--no-compile")
    assert result.exit_code == 0, result.output
    manifest = check_build_folder(tmp_path / "hopper_k2_bf16out", spec_file, ())
    assert manifest["nvrtc_version"] is None and manifest["archs"] == {}


def test_build_bad_spec(tmp_path: Path) -> None:
    result = run("build", write(tmp_path, "bad.yaml", BAD_SPEC), "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "recurrence.window_blocks" in result.output
    assert not (tmp_path / "out").exists()


def test_build_compile_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import swrgen.build

    good = swrgen.build.render_source
    monkeypatch.setattr(swrgen.build, "render_source", lambda spec: good(spec) + "\nthis is not cuda;\n")
    result = run("build", spec_path("hopper_k1"), "-o", tmp_path, "--arch", "sm_80")
    assert result.exit_code == 1
    assert "could not compile swr.cu for sm_80" in result.output
    assert "this is not cuda;" in result.output  # the marked source line


def test_load_generated_uses_built_cubins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file = spec_path("hopper_k1")
    assert run("build", spec_file, "-o", tmp_path, "--arch", "sm_80").exit_code == 0
    folder = tmp_path / "hopper_k1"
    monkeypatch.setattr(cache_module, "compile_cubin", lambda *a, **k: pytest.fail("recompiled a built cubin"))
    program = load_generated(folder)
    assert program.spec == load_spec(spec_file)
    assert program.source == (folder / "swr.cu").read_text()
    assert program.cubins["sm_80"] == (folder / "swr.sm_80.cubin").read_bytes()

    # A cubin that no longer matches the manifest is not trusted.
    (folder / "swr.sm_80.cubin").write_bytes(b"\x7fELF damaged")
    monkeypatch.undo()
    assert "sm_80" not in load_generated(folder).cubins


def test_load_generated_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="swrgen build"):
        load_generated(tmp_path)


# --- demo -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["hopper_k2", "hopper_k3", "hopper_k2_bf16out"])
def test_demo_on_cpu(stem: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU path")
    result = run("demo", spec_path(stem), "--length", 77, "--batch", 1, "--heads", 2)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["spec"] == stem
    assert report["device"].startswith("cpu")
    assert report["shape"] == [1, 2, 16, 77]
    assert 0 <= report["rel_err_vs_float64"] < 2e-3
    assert "rel_err" in result.output


def test_demo_per_channel_fp32(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pc.yaml",
        "name: pc\nrecurrence:\n  head_dim: 32\n  gate_layout: per_channel\n  dtypes: {input: fp32}\n",
    )
    result = run("demo", path, "--length", 50, "--batch", 1, "--heads", 1)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["shape"] == [1, 1, 32, 50]
    assert report["rel_err_vs_float64"] < 1e-6  # fp32 in, fp32 out: only the final rounding


def test_demo_default_spec() -> None:
    result = run("demo", "--length", 20, "--batch", 1, "--heads", 1)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spec"] == "hopper_k2"


# --- spec arguments: a file or a shipped name -----------------------------------------------------------


def test_commands_take_shipped_spec_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = spec_path("hopper_k3")
    result = run("validate", "hopper_k3", "hopper_k1.yaml")
    assert result.exit_code == 0, result.output
    assert f"ok    {shipped}" in result.output and f"ok    {spec_path('hopper_k1')}" in result.output
    shown = run("show", "hopper_k3")
    assert shown.exit_code == 0 and shown.output.startswith(f"# {shipped}  digest {load_spec(shipped).digest()}")
    # build writes under the current folder by default: ./generated/<name>/
    monkeypatch.chdir(tmp_path)
    built = run("build", "hopper_k2", "--no-compile")
    assert built.exit_code == 0, built.output
    assert (tmp_path / "generated" / "hopper_k2" / "swr.cu").read_text() == render_source(
        load_spec(spec_path("hopper_k2"))
    )


def test_a_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "hopper_k2", "name: mine\n")
    result = run("validate", "hopper_k2")
    assert result.exit_code == 0 and "(mine, digest" in result.output


@pytest.mark.parametrize("command", ["validate", "show", "build", "demo", "tune"])
def test_unknown_spec_lists_the_shipped_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(command, "hopper_k9")
    assert result.exit_code == 2
    assert "'hopper_k9' does not exist as a file and is not the name of a shipped spec" in result.output
    assert "shipped specs: " + ", ".join(p.stem for p in SPEC_PATHS) in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_a_folder_is_not_a_spec(tmp_path: Path) -> None:
    result = run("show", tmp_path)
    assert (
        result.exit_code == 2 and "is a folder; give a spec file (.yaml) or the name of a shipped spec" in result.output
    )


# --- demo: argument ranges ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [("--length", 0, "x>=1"), ("--batch", -1, "x>=1"), ("--heads", 0, "x>=1"), ("--seed", -1, "0<=x<=")],
)
def test_demo_rejects_bad_sizes(option: str, value: int, allowed: str) -> None:
    result = run("demo", "--length", 20, option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}': {value} is not in the range {allowed}" in result.output
    assert "Traceback" not in result.output


# --- tune: the grid is checked before any GPU work ------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "fragments"),
    [
        ("warps_per_cta=3", ["no candidate is valid: warps_per_cta=3 is not allowed (allowed: 1, 2, 4, 8, 16, 32)"]),
        (
            "tiles_in_flight=3,5",
            ["no candidate is valid: tiles_in_flight=3,5 is not allowed (allowed: 1, 2, 4, 8, 16)"],
        ),
        ("tiles_per_warp=0", ["no candidate is valid: tiles_per_warp=0 is not allowed (allowed: 1..65536)"]),
        ("persistent=1", ["no candidate is valid: persistent=1 is not allowed (allowed: true, false)"]),
        ("warps_per_cta=true", ["warps_per_cta=true is not allowed (allowed: 1, 2, 4"]),
        ("staging=global", ["staging=global is not allowed (allowed: registers, shared)"]),
        # one bad value among good ones is still an error (it would silently drop candidates)
        ("warps_per_cta=3,4", ["--grid: warps_per_cta=3 is not allowed (allowed: 1, 2, 4, 8, 16, 32)"]),
    ],
)
def test_tune_rejects_grid_values(grid: str, fragments: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("the grid was not checked first"))
    result = run("tune", "hopper_k2", "--grid", grid)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output.replace("\n", " "), result.output
    assert grid.startswith("warps_per_cta=3,") == ("no candidate is valid" not in result.output)


def test_tune_rejects_a_grid_with_no_valid_combination(monkeypatch: pytest.MonkeyPatch) -> None:
    from swrgen.compiler import CompileCache

    monkeypatch.setattr(CompileCache, "compile", lambda *a, **k: pytest.fail("compiled before checking the grid"))
    # each value is allowed, but no combination fits: clusters need sm_90+, 16 tiles in flight need shared staging
    result = run("tune", "hopper_k2", "--compile-only", "--arch", "sm_80", "--grid", "cluster_size=2")
    assert result.exit_code == 2
    text = result.output.replace("\n", " ")
    assert "no candidate is valid: no combination of cluster_size=2" in text and "on sm_80" in text
    assert "cluster_size 2 needs one of sm_90" in text
    result = run("tune", "hopper_k2", "--compile-only", "--grid", "tiles_in_flight=16;staging=registers")
    assert result.exit_code == 2
    text = result.output.replace("\n", " ")
    assert "no candidate is valid: no combination of tiles_in_flight=16; staging=registers" in text
    assert "target.tiles_in_flight" in text and "allowed" not in text.split("no candidate is valid")[0]


# --- the top-level guard: one line, no traceback --------------------------------------------------------


def test_unexpected_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.delenv("SWRGEN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "load_spec", boom)
    result = run("validate", "hopper_k2")
    assert result.exit_code == 1
    assert result.output == (
        "Error: ZeroDivisionError: division by zero; second line (unexpected; SWRGEN_DEBUG=1 shows the traceback)\n"
    )


def test_unexpected_error_traceback_with_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_spec", lambda path: 1 / 0)
    monkeypatch.setenv("SWRGEN_DEBUG", "1")
    result = CliRunner().invoke(cli.main, ["validate", "hopper_k2"])
    assert isinstance(result.exception, ZeroDivisionError)
    assert "SWRGEN_DEBUG=1" in run("--help").output


def test_os_error_is_reported_with_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli, "load_spec", no_read)
    result = run("validate", "hopper_k2")
    assert result.exit_code == 1
    assert result.output == f"Error: {spec_path('hopper_k2')}: Permission denied\n"


def test_usage_errors_keep_clicks_exit_code() -> None:
    result = run("build")
    assert result.exit_code == 2 and "Missing argument 'SPEC'" in result.output


# --- build: where the output cannot be written ----------------------------------------------------------


def test_build_out_is_a_file(tmp_path: Path) -> None:
    target = write(tmp_path, "afile", "")
    result = run("build", "hopper_k2", "--no-compile", "-o", target)
    assert result.exit_code == 2
    text = result.output.replace("\n", " ")
    assert f"'{target}' is a file" in text and "choose another -o" in text and "Traceback" not in text
    nested = run("build", "hopper_k2", "--no-compile", "-o", target / "sub")
    assert nested.exit_code == 1
    assert f"cannot write the build output to {target / 'sub' / 'hopper_k2'}/" in nested.output
    assert "Not a directory" in nested.output and "a part of that path is a file" in nested.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder anyway")
def test_build_into_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run("build", "hopper_k2", "--no-compile", "-o", folder)
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 1
    assert f"cannot write the build output to {folder / 'hopper_k2'}/" in result.output
    assert "Permission denied" in result.output and "fix the folder's permissions" in result.output


@pytest.mark.parametrize(
    ("code", "strerror", "advice"),
    [
        (errno.EROFS, "Read-only file system", "that disk is read-only: choose a folder on a writable disk with -o"),
        (errno.ENOSPC, "No space left on device", "the disk is full: free some space or choose a folder on another"),
        (errno.EACCES, "Permission denied", "no permission to write there"),
        (errno.EIO, "Input/output error", "check that the folder can be written and its disk has space"),
    ],
)
def test_build_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, strerror: str, advice: str
) -> None:
    import swrgen.build

    def fail(spec, out_root, *args, **kwargs):
        raise OSError(code, strerror, str(Path(out_root) / spec.name / "swr.cu"))

    monkeypatch.setattr(swrgen.build, "build", fail)
    result = run("build", "hopper_k2", "--no-compile", "-o", tmp_path)
    assert result.exit_code == 1
    folder = tmp_path / "hopper_k2"
    expected = f"Error: cannot write the build output to {folder}/ ({folder / 'swr.cu'}: {strerror}); {advice}"
    assert result.output.replace("\n", " ").startswith(expected), result.output
    assert "Traceback" not in result.output


def test_build_error_of_the_build_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import swrgen.build

    build_error = getattr(swrgen.build, "BuildError", None)
    if build_error is None:  # the contract of swrgen.build: a RuntimeError subclass that names the path
        build_error = type("BuildError", (RuntimeError,), {})
        monkeypatch.setattr(swrgen.build, "BuildError", build_error, raising=False)

    def fail(spec, out_root, *args, **kwargs):
        path = Path(out_root) / spec.name / "manifest.json"
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        except OSError as err:
            raise build_error(f"could not write {path}: {err.strerror}") from err

    monkeypatch.setattr(swrgen.build, "build", fail)
    result = run("build", "hopper_k2", "--no-compile", "-o", tmp_path)
    assert result.exit_code == 1
    text = result.output.replace("\n", " ")
    assert f"could not write {tmp_path / 'hopper_k2' / 'manifest.json'}: No space left on device" in text
    assert "the disk is full" in text and "Traceback" not in text


def test_build_runtime_error_without_build_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import swrgen.build

    monkeypatch.delattr(swrgen.build, "BuildError", raising=False)
    monkeypatch.setattr(swrgen.build, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("driver gone")))
    result = run("build", "hopper_k2", "--no-compile", "-o", tmp_path)
    assert result.exit_code == 1
    assert result.output == f"Error: the build into {tmp_path / 'hopper_k2'}/ failed: driver gone\n"


def test_validate_a_name_too_long_for_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "long.yaml", f"name: {'a' * 300}\n")
    result = run("validate", path)
    assert result.exit_code == 1
    assert f"{path}:1: name: got a name of 300 characters" in result.stderr
    assert "allowed: an identifier matching [A-Za-z_][A-Za-z0-9_]* of at most 64 characters" in result.stderr


def test_version_without_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running from a source tree that was never installed: no metadata, the constant in swrgen/__init__.py."""
    import importlib.metadata

    import swrgen

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert swrgen.__version__ == swrgen._VERSION
    result = run("--version")
    assert result.exit_code == 0 and result.output == f"swrgen, version {swrgen._VERSION}\n"


def test_broken_pipe_is_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """`swrgen list | head -1`: the reader left; no error to print, exit code 1."""

    def gone(path):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "load_spec", gone)
    result = run("list")
    assert result.exit_code == 1 and result.output == ""


def test_build_report_says_when_nvrtc_logs_no_spills() -> None:
    from swrgen.cli import _spill

    assert _spill(None) == "spill not reported"
    assert _spill(0) == "0B spill" and _spill(24) == "24B spill"
