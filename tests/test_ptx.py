"""What the kernels' PTX must look like, where NVVM once chose otherwise and the kernels paid for it. CPU only:
NVRTC's PTX, no GPU.

- The vector kernels store each lane's dx / y chunks as whole 16-byte stores (PTX st.global.v4), the state
  backward too: NVVM once split that kernel's dx store into four 4-byte stores (5x the L2 write sectors,
  bench/results/log.md run 114), which `store16` (templates/swr_common.cuh.j2) now prevents.
- No kernel keeps an array in local memory: the state backward once kept a tile's da terms there, stored and
  reloaded on every tile, because a select `t0 + e == 0 ? dav[e] : ...` became a dynamic index (run 116)."""

from __future__ import annotations

import functools
import re

import pytest

from swrgen.codegen import render_source
from swrgen.compiler import nvrtc
from swrgen.spec import SPECS_DIR, load_spec

# The H200's tuned backward shape (shared staging, 2 stages, F = 4, W = 4, T = 15).
H200_BWD = dict(staging="shared", stages=2, tiles_in_flight=4, warps_per_cta=4, tiles_per_warp=15)


@functools.cache
def kernel_ptx(source: str, arch: str) -> dict[str, str]:
    """Each kernel's PTX body (NVRTC for the virtual arch of ``arch``)."""
    from cuda.bindings import nvrtc as rtc

    opts = [o.replace(f"={arch}", f"=compute_{arch.removeprefix('sm_')}") for o in nvrtc.compile_options(arch)]
    err, prog = rtc.nvrtcCreateProgram(source.encode(), b"swr.cu", 0, [], [])
    assert err == rtc.nvrtcResult.NVRTC_SUCCESS
    (err,) = rtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    assert err == rtc.nvrtcResult.NVRTC_SUCCESS, opts
    err, size = rtc.nvrtcGetPTXSize(prog)
    buf = b" " * size
    rtc.nvrtcGetPTX(prog, buf)
    rtc.nvrtcDestroyProgram(prog)
    ptx = buf.decode()
    parts = re.split(r"\.entry\s+(\w+)\(", ptx)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("spec_name", ["hopper_k2", "hopper_k3", "hopper_k2_bf16out"])
def test_backward_kernels_store_dx_whole(spec_name: str) -> None:
    bodies = spec_ptx(spec_name, h200=True)  # these specs build sm_90a first
    wide = re.compile(r"st\.global\.v4\.u32")
    plain = len(wide.findall(bodies["swr_bwd_vec"]))
    assert plain > 0
    # the state kernels store dx as the plain one does: as many 16-byte stores, and no 4-byte ones of dx
    for name in ("swr_bwd_state_vec", "swr_bwd_state_aligned_vec"):
        assert len(wide.findall(bodies[name])) == plain, name


@functools.cache
def spec_ptx(spec_name: str, h200: bool) -> dict[str, str]:
    """The kernels' PTX of a shipped spec at its own target, or (``h200``) at the H200's tuned backward shape."""
    spec = load_spec(SPECS_DIR / f"{spec_name}.yaml")
    if h200:
        spec = spec.replace_target(**H200_BWD)
    return kernel_ptx(render_source(spec), spec.target.archs[0])


@pytest.mark.parametrize(
    ("spec_name", "h200"),
    [(p.stem, False) for p in sorted(SPECS_DIR.glob("*.yaml"))] + [("hopper_k2", True), ("hopper_k3", True)],
)
def test_no_kernel_keeps_a_local_array(spec_name: str, h200: bool) -> None:
    bodies = spec_ptx(spec_name, h200)
    assert len(bodies) >= 8
    local = sorted(name for name, body in bodies.items() if ".local" in body)
    assert local == [], f"{spec_name}: PTX local memory (an array NVVM could not keep in registers) in {local}"
