"""bench/distributed/cp_scaling.py answers --help without a GPU (as a module and as a file) and says that it
needs one otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_help_as_module(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.distributed import cp_scaling

    with pytest.raises(SystemExit) as exc:
        cp_scaling.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--weak-tokens" in out


def test_help_as_file() -> None:
    done = subprocess.run([sys.executable, "bench/distributed/cp_scaling.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.distributed import cp_scaling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"bench/distributed/cp_scaling\.py needs a CUDA device"):
        cp_scaling.main([])


def test_group_sizes() -> None:
    from bench.distributed.cp_scaling import _sizes

    assert _sizes(8, None) == [1, 2, 4, 8]
    assert _sizes(6, None) == [1, 2, 4, 6]
    assert _sizes(1, None) == [1]
    assert _sizes(8, [8, 2, 2]) == [2, 8]
    with pytest.raises(SystemExit, match=r"outside 1\.\.4"):
        _sizes(4, [5])


def test_smoke_run_under_torchrun(tmp_path: Path) -> None:
    """The whole script under torchrun with 2 CPU ranks (gloo, --device cpu): every row of the JSON is there."""
    import json

    from swrgen.distributed.testing import free_port

    out = tmp_path / "cp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "bench/distributed/cp_scaling.py", "--device", "cpu", "--dim", "32", "--kv-heads", "1", "--tokens", "300",
           "--weak-tokens", "100", "--steps", "2", "--warmup", "1", "--json", str(out)]  # fmt: skip
    # A session of its own: on a timeout the launcher *and* its workers go (killing torchrun alone orphans them).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2
    assert [r["ranks"] for r in data["strong"]] == [1, 2] and [r["ranks"] for r in data["weak"]] == [1, 2]
    assert data["strong"][1]["tokens_per_rank"] == [150, 150] and data["weak"][1]["tokens"] == 200
    assert all(v == 0.0 for v in data["check"].values()), data["check"]  # float32 on the CPU: exact
    assert data["strong"][0]["state_bytes_per_edge"] == 2 * 16 * 4 * 4  # H * DH * (2 + 2(k-1)) * 4
