"""The tree stays ruff-clean (pyproject.toml's [tool.ruff] rules): a lint error fails CI like a test."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_check_passes() -> None:
    paths = [p for p in ("swrgen", "tests", "bench", "examples") if (REPO / p).is_dir()]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
