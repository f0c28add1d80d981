"""Shared test setup.

* The whole session compiles into its own temporary cubin cache (``SWRGEN_CACHE_DIR``, set by an autouse
  session fixture before the first test runs and inherited by subprocesses), so tests never read a stale
  entry from, or write into, the user's ``~/.cache/swrgen``. ``$SWRGEN_TEST_CACHE_SEED`` names a cache to
  copy in first (a GPU run with cubins built beforehand).
* Tests marked ``gpu`` are skipped when torch sees no CUDA device (CI and developer machines have none);
  they live in ``tests/test_gpu_*.py`` and only there (checked at collection).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from swrgen import resources

REPO = Path(__file__).resolve().parents[1]
SPECS_DIR = resources.specs_dir()  # specs/ of this checkout (test_spec.py checks that it is)
SPEC_PATHS = list(resources.shipped_specs().values())


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cubin cache directory every test in this session compiles into."""
    path = tmp_path_factory.mktemp("swrgen-cache")
    seed = os.environ.get("SWRGEN_TEST_CACHE_SEED")  # e.g. warmed by bench/tools/warm_cache.py
    if seed:
        shutil.copytree(seed, path, dirs_exist_ok=True)  # entries are keyed by source and NVRTC version
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWRGEN_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def tuned_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary $SWRGEN_CACHE_DIR (so its own tuned/ folder), no shipped configs, an empty memo."""
    from swrgen.tune import store

    monkeypatch.setenv("SWRGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    store.clear_memo()
    yield tmp_path / "cache"
    store.clear_memo()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One marker and one place for GPU tests: every test in tests/test_gpu_*.py is marked `gpu` (their
    # `pytestmark`), and no other test is; a test that breaks the rule fails collection.
    def misplaced_gpu(item: pytest.Item) -> bool:
        return (item.get_closest_marker("gpu") is not None) != Path(str(item.fspath)).name.startswith("test_gpu_")

    misplaced = [item.nodeid for item in items if misplaced_gpu(item)]
    if misplaced:
        raise pytest.UsageError("GPU tests (marker `gpu`) must live in tests/test_gpu_*.py, and only there: "
                                + ", ".join(misplaced[:5]))  # fmt: skip
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _never_the_user_cache() -> None:
    # Guards every test: a test that changes SWRGEN_CACHE_DIR must use monkeypatch, so it is restored.
    value = os.environ.get("SWRGEN_CACHE_DIR")
    assert value, "SWRGEN_CACHE_DIR is unset: an earlier test removed it without monkeypatch"
    assert Path(value).resolve() != (Path.home() / ".cache" / "swrgen").resolve()
