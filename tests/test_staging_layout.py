"""The shared-memory layout of target.staging: shared (swrgen/spec/staging.py), on the CPU."""

from __future__ import annotations

import pytest

from swrgen import constants as C
from swrgen.codegen import kernel_shared_bytes, render_source
from swrgen.spec import default_spec
from swrgen.spec.staging import layout, padded_stride, spec_layouts


@pytest.mark.parametrize("row_bytes", [16, 32, 64, 100, 128, 256, 320, 512, 1024])
def test_padded_stride_fits_and_skews_the_banks(row_bytes: int) -> None:
    stride = padded_stride(row_bytes)
    assert stride >= row_bytes and stride % C.VECTOR_BYTES == 0
    assert stride % C.SHARED_BANK_BYTES == C.SHARED_ROW_SKEW
    # Four consecutive rows (one quarter-warp's 16-byte reads) start in four different 32-byte bank groups.
    assert len({(r * stride) % C.SHARED_BANK_BYTES // 32 for r in range(4)}) == 4


def test_forward_layout_bf16_in_fp32_out() -> None:
    rec = default_spec(window_blocks=2).recurrence  # bf16 in, bf16 gates per head, fp32 out, BL 16
    lay = layout("fwd", rec, tiles_in_flight=8, warps_per_cta=2, stages=2)
    x, a = lay.streams["x"], lay.streams["a"]
    assert (x.count, x.copy, x.offset) == (16, 8 * 16 * 2, 0)
    assert (a.count, a.copy, a.offset) == (1, 8 * 16 * 2, x.end)
    assert lay.stage_bytes == a.end
    assert not lay.out_in_stage and (lay.out.count, lay.out.copy) == (16, 8 * 16 * 4)  # y after the ring
    assert lay.out.offset == 2 * lay.stage_bytes
    assert lay.cta_bytes == 2 * (2 * lay.stage_bytes + 16 * lay.out.stride)


def test_forward_y_as_wide_as_x_goes_over_x_in_the_stage() -> None:
    rec = default_spec(window_blocks=2, output_dtype="bf16").recurrence
    lay = layout("fwd", rec, tiles_in_flight=8, warps_per_cta=1, stages=3)
    assert lay.out_in_stage and lay.out == lay.streams["x"]
    assert lay.warp_bytes == 3 * lay.stage_bytes  # no output buffer


def test_backward_layout_holds_the_halo_and_the_next_gate() -> None:
    rec = default_spec(window_blocks=3, gate_layout="per_channel").recurrence
    lay = layout("bwd", rec, tiles_in_flight=4, warps_per_cta=1, stages=2)
    assert lay.streams["x"].copy == 4 * 16 * 2
    assert lay.streams["dy"].copy == (4 + 2) * 16 * 4  # the k-1 tiles the batch finishes, fp32 dy
    assert lay.streams["a"].count == 16 and lay.streams["a"].copy == (4 + 2) * 16 * 2 + C.VECTOR_BYTES
    assert lay.out.count == (16 if C.STAGE_OUTPUTS["bwd"] else 0)


def test_kernel_shared_bytes_and_the_source_agree() -> None:
    spec = default_spec(window_blocks=2)
    assert kernel_shared_bytes(spec) == {}  # registers staging: no dynamic shared memory
    shared = spec.replace_target(staging="shared", stages=3)
    lays = spec_layouts(shared.recurrence, shared.target)
    fwd, bwd = lays["fwd"].cta_bytes, lays["bwd"].cta_bytes  # the state entry points stage like the plain ones
    assert kernel_shared_bytes(shared) == {"swr_fwd_vec": fwd, "swr_fwd_state_vec": fwd, "swr_bwd_vec": bwd,
                                           "swr_bwd_state_vec": bwd}  # fmt: skip
    source = render_source(shared)
    assert f"constexpr int kFwdWarpBytes = {lays['fwd'].warp_bytes};" in source
    assert f"constexpr int kBwdWarpBytes = {lays['bwd'].warp_bytes};" in source
    assert "constexpr bool kStaged = true;" in source and "constexpr int kStages = 3;" in source
