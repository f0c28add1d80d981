"""Where the files swrgen ships live: the Jinja2 CUDA templates and the shipped specs.

This module is the only place that knows. In the repository they are the top-level folders ``templates/``
and ``specs/``; pyproject.toml installs them as the packages ``swrgen.templates`` and ``swrgen.specs``
(``package-dir``), so a wheel, an sdist build and an editable install (``pip install -e .``) all serve them
through ``importlib.resources``. In a source tree (the folders beside ``swrgen/``) those folders win: a
checkout on ``sys.path`` renders its own templates even where another checkout is installed editable (whose
finder would otherwise serve ``swrgen.templates`` from there), and one never installed has no such packages.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

TEMPLATES_PACKAGE = "swrgen.templates"
SPECS_PACKAGE = "swrgen.specs"
SPEC_SUFFIX = ".yaml"
DEFAULT_SPEC_NAME = "hopper_k2"

_CHECKOUT = Path(__file__).resolve().parents[1]
_CHECKOUT_FOLDERS = {TEMPLATES_PACKAGE: _CHECKOUT / "templates", SPECS_PACKAGE: _CHECKOUT / "specs"}
# A file each folder of a source tree has: beside an installed swrgen (site-packages) no folder has it.
_MARKERS = {TEMPLATES_PACKAGE: "swr.cu.j2", SPECS_PACKAGE: DEFAULT_SPEC_NAME + SPEC_SUFFIX}


@functools.cache
def _folder(package: str) -> Path:
    beside = _CHECKOUT_FOLDERS[package]
    if (beside / "__init__.py").is_file() and (beside / _MARKERS[package]).is_file():
        return beside  # a source tree: code and templates of the same tree
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"swrgen's data package {package} is missing (and {beside} is no source folder): the "
            "installation is broken; reinstall swrgen (pip install swrgen, or pip install -e . in a checkout)"
        ) from None
    # pip installs packages unpacked, so this is a real folder; jinja2 and the CLI need real paths.
    if not isinstance(root, Path) or not root.is_dir():
        raise RuntimeError(f"swrgen's data package {package} is not a folder on disk ({root}); reinstall swrgen")
    return root


def templates_dir() -> Path:
    """The folder of the Jinja2 templates (``swr.cu.j2`` and what it includes)."""
    return _folder(TEMPLATES_PACKAGE)


def specs_dir() -> Path:
    """The folder of the shipped specs."""
    return _folder(SPECS_PACKAGE)


def shipped_specs() -> dict[str, Path]:
    """Shipped spec name (the file stem, e.g. ``hopper_k2``) -> its file, sorted by name."""
    return {p.stem: p for p in sorted(specs_dir().glob(f"*{SPEC_SUFFIX}"))}


def shipped_spec(name: str) -> Path:
    """The file of the shipped spec ``name`` (``hopper_k2`` or ``hopper_k2.yaml``).

    LookupError, whose message lists the shipped names, when there is none of that name.
    """
    specs = shipped_specs()
    stem = name[: -len(SPEC_SUFFIX)] if name.endswith(SPEC_SUFFIX) else name
    if stem not in specs:
        raise LookupError(f"no shipped spec named {name!r}; shipped: {', '.join(specs)}")
    return specs[stem]


def default_spec_file() -> Path:
    """The spec ``swrgen demo`` runs when given none."""
    return shipped_spec(DEFAULT_SPEC_NAME)
