"""Packaging: what the package ships, what an import loads, and the wheel installed on its own.

The fast tests here run from the checkout. ``test_wheel_in_a_fresh_venv`` (marked ``install``, ~2 min, in the
default run; ``-m 'not install'`` skips it) builds the sdist and, from it, the wheel (``python -m build``),
installs the wheel into a new venv outside the checkout (torch from the local CPU wheel, never a download)
and runs the CLI from an empty folder, as a user who only has the wheel would.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, SPEC_PATHS

import swrgen
from swrgen import resources

HEAVY = ("torch", "torch._dynamo", "cuda", "cuda.bindings")
# what a source copy for the build leaves out: environments, caches, build outputs, and large folders the
# package does not ship
BUILD_IGNORES = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache",
                 "generated", "bench", "*.cubin")  # fmt: skip


def installed() -> bool:
    try:
        importlib.metadata.version("swrgen")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unavailable(reason: str) -> None:
    """CI must run every install check; elsewhere a missing tool only skips."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI runs this test)")
    pytest.skip(reason)


# --- the package's files --------------------------------------------------------------------------------


def test_every_folder_under_swrgen_is_a_listed_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(p.relative_to(REPO).parts)
        for p in [REPO / "swrgen", *(REPO / "swrgen").rglob("*")]
        if p.is_dir() and p.name != "__pycache__"
    }
    listed = set(config["packages"])
    assert folders - listed == set(), "folders under swrgen/ that pyproject.toml [tool.setuptools] packages lacks"
    assert listed - folders == {"swrgen.templates", "swrgen.specs"}
    assert config["package-dir"] == {"swrgen.templates": "templates", "swrgen.specs": "specs"}


def test_resources_are_the_checkouts_folders() -> None:
    assert resources.templates_dir() == REPO / "templates"
    assert resources.specs_dir() == REPO / "specs"
    assert list(resources.shipped_specs().values()) == SPEC_PATHS == sorted((REPO / "specs").glob("*.yaml"))
    assert (
        resources.shipped_spec("hopper_k2") == resources.shipped_spec("hopper_k2.yaml") == REPO / "specs/hopper_k2.yaml"
    )
    assert resources.default_spec_file() == REPO / "specs" / "hopper_k2.yaml"
    with pytest.raises(LookupError, match="no shipped spec named 'nope'; shipped: ampere_k2, hopper_k1, "):
        resources.shipped_spec("nope")
    from swrgen.codegen import TEMPLATE_DIR
    from swrgen.spec import SPECS_DIR

    assert TEMPLATE_DIR == REPO / "templates" and SPECS_DIR == REPO / "specs"


def test_editable_install_serves_the_data_packages() -> None:
    """`pip install -e .` (scripts/setup.sh) maps swrgen.templates / swrgen.specs onto the checkout's folders."""
    if not installed():
        pytest.skip("swrgen is not installed here (a source tree on sys.path only)")
    code = "import swrgen.templates as t, swrgen.specs as s; print(t.__file__); print(s.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.split() == [str(REPO / "templates" / "__init__.py"), str(REPO / "specs" / "__init__.py")]


def _copy_of_the_source_tree(tmp_path: Path) -> Path:
    """swrgen/, templates/ and specs/ of this checkout copied to tmp_path/tree (no caches)."""
    tree = tmp_path / "tree"
    for name in ("swrgen", "templates", "specs"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_a_source_tree_never_installed_finds_its_folders(tmp_path: Path) -> None:
    """Only on sys.path, no install (no editable finder): swrgen.resources falls back to the folders beside
    swrgen/, and the version to the constant."""
    tree = _copy_of_the_source_tree(tmp_path)
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = (
        f"import sys; sys.path[:0] = [{str(tree)!r}]; sys.path += {site!r}\n"  # site-packages, not their .pth files
        "import importlib.metadata as md, importlib.util as u\n"
        "md.version = lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name))\n"
        "import swrgen, swrgen.resources as r\n"
        "from swrgen.codegen import render_source\n"
        "from swrgen.spec import load_spec\n"
        "assert u.find_spec('swrgen.templates') is None\n"
        "render_source(load_spec(r.shipped_spec('hopper_k2')))\n"
        "print(swrgen.__file__, r.templates_dir(), r.specs_dir(), swrgen.__version__)"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tree / "swrgen" / "__init__.py"), str(tree / "templates"),
                                     str(tree / "specs"), swrgen._VERSION]  # fmt: skip


def test_a_second_checkout_renders_its_own_templates(tmp_path: Path) -> None:
    """A second source tree first on sys.path, with this checkout installed editable: its code and its own
    templates and specs, not the installed checkout's (whose editable finder serves swrgen.templates)."""
    if not installed():
        pytest.skip("swrgen is not installed here (a source tree on sys.path only)")
    tree = _copy_of_the_source_tree(tmp_path)
    marker = "// a second checkout's template\n"
    swr = tree / "templates" / "swr.cu.j2"
    swr.write_text(marker + swr.read_text())
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r})\n"
        "import swrgen, swrgen.resources as r\n"
        "from swrgen.codegen import render_source\n"
        "from swrgen.spec import load_spec\n"
        f"assert {marker.strip()!r} in render_source(load_spec(r.shipped_spec('hopper_k2')))\n"
        "print(swrgen.__file__, r.templates_dir(), r.specs_dir())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tree / "swrgen" / "__init__.py"), str(tree / "templates"), str(tree / "specs")]


# --- the package's namespace ----------------------------------------------------------------------------


def test_lazy_public_names() -> None:
    from swrgen.ops.phalanx import phalanx_gating
    from swrgen.ops.swr import SwrOp, load, swr
    from swrgen.spec import Spec, SpecError, load_spec

    assert sorted(swrgen.__all__) == sorted(
        ["Spec", "SpecError", "SwrOp", "__version__", "load", "load_spec", "phalanx_gating", "swr"]
    )
    expected = {"phalanx_gating": phalanx_gating, "SwrOp": SwrOp, "load": load, "swr": swr, "Spec": Spec,
                "SpecError": SpecError, "load_spec": load_spec}  # fmt: skip
    for name, value in expected.items():
        assert getattr(swrgen, name) is value
    assert set(swrgen.__all__) <= set(dir(swrgen))
    assert isinstance(swrgen.__version__, str) and swrgen.__version__
    namespace: dict[str, object] = {}
    exec("from swrgen import *", namespace)
    assert set(swrgen.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="module 'swrgen' has no attribute 'nope'"):
        _ = swrgen.nope  # type: ignore[attr-defined]


def modules_after(code: str) -> set[str]:
    """The heavy modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("HEAVY:"), result.stdout
    return set(filter(None, last.removeprefix("HEAVY:").split(",")))


@pytest.mark.parametrize(
    "code",
    [
        "import swrgen",
        "import swrgen.spec",
        "import swrgen.constants",
        "import swrgen.resources",
        "import swrgen.cli",
        "from swrgen.spec import SPECS_DIR, load_spec; load_spec(SPECS_DIR / 'hopper_k2.yaml')",
        "import swrgen; swrgen.Spec, swrgen.SpecError, swrgen.load_spec, swrgen.__version__",
    ],
)
def test_light_imports(code: str) -> None:
    assert modules_after(code) == set()


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "hopper_k2", "hopper_k2_fused"],
        ["list"],
        ["show", "hopper_k3"],
        ["show", "--source", "hopper_k2_fused"],
        ["--version"],
    ],
)
def test_spec_commands_are_light(args: list[str]) -> None:
    code = (
        f"from swrgen import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code"
    )
    assert modules_after(code) == set()


def test_the_probe_sees_heavy_imports() -> None:
    """The check above can fail: the ops do load torch."""
    assert "torch" in modules_after("import swrgen; swrgen.swr")


# --- the wheel, installed alone -------------------------------------------------------------------------


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def clean_env(venv: Path, cache: Path) -> dict[str, str]:
    """The environment of a user with only that venv: no PYTHONPATH, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["SWRGEN_CACHE_DIR"] = str(cache)  # a fresh cubin cache: the build below really runs NVRTC
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.install
def test_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    from swrgen.codegen import render_source
    from swrgen.spec import load_spec

    try:
        import build  # noqa: F401  (python -m build: the test extra)
    except ImportError:
        unavailable("the `build` package is missing (pip install -e '.[test]')")
    torch_version = importlib.metadata.version("torch")  # the CPU build this suite runs on

    # sdist, then the wheel from the unpacked sdist: what the sdist lacks, the wheel lacks too. Built from a
    # copy, so that the build's swrgen.egg-info never lands in the checkout (where importlib.metadata sees it).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*BUILD_IGNORES))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], cwd=tmp_path, env=dict(os.environ))
    (sdist,) = dist.glob("swrgen-*.tar.gz")
    (wheel,) = dist.glob("swrgen-*.whl")
    version = swrgen._VERSION
    assert wheel.name == f"swrgen-{version}-py3-none-any.whl"
    templates = sorted(p.name for p in (REPO / "templates").glob("*.j2"))
    specs = sorted(p.name for p in SPEC_PATHS)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"templates/{t}" for t in templates} | {f"specs/{s}" for s in specs} <= names
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    sources = {str(p.relative_to(REPO)) for p in (REPO / "swrgen").rglob("*.py")}
    data = {f"swrgen/templates/{t}" for t in templates} | {f"swrgen/specs/{s}" for s in specs}
    tuned = {str(p.relative_to(REPO)) for p in (REPO / "swrgen" / "tune" / "tuned").glob("*.json")}
    assert sources | data | tuned | {"swrgen/templates/__init__.py", "swrgen/specs/__init__.py"} <= names
    assert not [n for n in names if n.split("/")[0] in ("templates", "specs", "tests", "bench")]

    # a fresh venv outside the checkout; torch from the local CPU wheel only (--no-index: never a CUDA download)
    venv = tmp_path / "venv"
    env = clean_env(venv, tmp_path / "cache")
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    py = str(venv / "bin" / "python")
    find_links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    torch_cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *find_links, f"torch=={torch_version}"]
    got_torch = subprocess.run(torch_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if got_torch.returncode != 0:
        unavailable(f"no local wheel of torch=={torch_version} to install offline:\n{got_torch.stderr[-2000:]}")
    pin = tmp_path / "pin.txt"
    pin.write_text(f"torch=={torch_version}\n")  # the rest may come from the registry, torch may not change
    run([py, "-m", "pip", "install", "-q", "-c", str(pin), str(wheel)], cwd=tmp_path, env=env)

    work = tmp_path / "work"
    work.mkdir()
    where = run([py, "-c", "import swrgen, swrgen.resources as r; print(swrgen.__file__); print(r.templates_dir()); "
                 "print(r.specs_dir()); print(swrgen.__version__)"], cwd=work, env=env).stdout.split()  # fmt: skip
    site = Path(where[0]).parents[1]
    assert site.is_relative_to(venv) and site.name == "site-packages", where
    assert where[1:3] == [str(site / "swrgen" / "templates"), str(site / "swrgen" / "specs")]
    assert where[3] == version
    assert not (site / "specs").exists() and not (site / "templates").exists()

    swrgen_cli = str(venv / "bin" / "swrgen")
    assert run([swrgen_cli, "--version"], cwd=work, env=env).stdout == f"swrgen, version {version}\n"
    listed = run([swrgen_cli, "list"], cwd=work, env=env).stdout.splitlines()
    assert [line.split()[0] for line in listed] == specs
    shown = run([swrgen_cli, "show", "hopper_k2"], cwd=work, env=env).stdout
    assert shown.startswith(f"# {site / 'swrgen' / 'specs' / 'hopper_k2.yaml'}  digest ")
    source = run([swrgen_cli, "show", "--source", "hopper_k2_fused"], cwd=work, env=env).stdout
    assert source == render_source(load_spec(REPO / "specs" / "hopper_k2_fused.yaml"))

    run([swrgen_cli, "build", "hopper_k2", "--no-compile"], cwd=work, env=env)
    built = json.loads((work / "generated" / "hopper_k2" / "manifest.json").read_text())
    assert built["spec_digest"] == load_spec(REPO / "specs" / "hopper_k2.yaml").digest()
    assert (work / "generated" / "hopper_k2" / "swr.cu").read_text() == render_source(
        load_spec(REPO / "specs/hopper_k2.yaml")
    )

    mine = work / "mine.yaml"
    mine.write_text((REPO / "specs" / "hopper_k1.yaml").read_text().replace("name: hopper_k1", "name: mine"))
    run([swrgen_cli, "validate", str(mine), "hopper_k2"], cwd=work, env=env)
    out = run([swrgen_cli, "build", "mine.yaml", "--arch", "sm_90a"], cwd=work, env=env).stdout
    assert "mine: wrote generated/mine/swr.cu" in out and "sm_90a: " in out and " regs, " in out, out
    assert (work / "generated" / "mine" / "swr.sm_90a.cubin").read_bytes()[:4] == b"\x7fELF"

    report = json.loads(run([swrgen_cli, "demo", "--length", "50", "--batch", "1", "--heads", "2"],
                            cwd=work, env=env).stdout)  # fmt: skip
    assert report["spec"] == "hopper_k2" and report["device"].startswith("cpu")
    assert report["rel_err_vs_float64"] < 2e-3

    bad = subprocess.run([swrgen_cli, "build", "hopper_k9"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "not the name of a shipped spec; shipped specs: ampere_k2" in bad.stderr
    assert "Traceback" not in bad.stderr
