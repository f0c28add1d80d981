"""The shared-memory layout of target.staging: shared (swrgen/spec/staging.py), on the CPU."""

from __future__ import annotations

import dataclasses

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
    if C.BWD_DY_RING["fp32"]:  # one ring of the stages' tiles and the k-1 tiles the first batch finishes, fp32 dy
        assert "dy" not in lay.streams and lay.dy_ring.copy == (2 * 4 + 2) * 16 * 4
        assert lay.dy_ring.offset == 2 * lay.stage_bytes and lay.out.offset == lay.dy_ring.offset + lay.ring_bytes
        assert lay.warp_bytes == 2 * lay.stage_bytes + lay.ring_bytes + lay.out_bytes
    else:
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
                                           "swr_bwd_state_vec": bwd, "swr_bwd_state_aligned_vec": bwd}  # fmt: skip
    source = render_source(shared)
    assert f"constexpr int kFwdWarpBytes = {lays['fwd'].warp_bytes};" in source
    assert f"constexpr int kBwdWarpBytes = {lays['bwd'].warp_bytes};" in source
    assert "constexpr bool kStaged = true;" in source and "constexpr int kStages = 3;" in source


def _wavefronts(addresses: list[int]) -> int:
    """Shared-memory wavefronts of one warp's 16-byte accesses: a quarter-warp (8 lanes) a phase, each phase
    as many wavefronts as the most distinct 4-byte words that meet in one bank."""
    total = 0
    for phase in range(0, 32, 8):
        banks: dict[int, set[int]] = {}
        for a in addresses[phase : phase + 8]:
            for word in range(a // 4, a // 4 + 4):
                banks.setdefault(word % 32, set()).add(word)
        total += max(len(words) for words in banks.values())
    return total


def _lane_reads(rows, lane_chunks: int, block_len: int, bytes_per: int) -> list[int]:
    """Wavefronts of each access of a lane read (StagedRows::read): lane 2c + h reads row c's half-tile h."""
    out = []
    for i in range(lane_chunks):
        addresses = []
        for lane in range(32):
            row, half = lane // C.LANES_PER_TILE, lane % C.LANES_PER_TILE
            col = half * (block_len // 2) * bytes_per // C.VECTOR_BYTES + i
            addresses.append(row * rows.stride + (col ^ (row & rows.swizzle)) * C.VECTOR_BYTES)
        out.append(_wavefronts(addresses))
    return out


def _copies(rows, swizzle: int) -> int:
    """Wavefronts of a stage's copy (StagedRows::copy): consecutive lanes on consecutive chunks of a row."""
    chunks = rows.copy // C.VECTOR_BYTES
    total = 0
    for first in range(0, 16 * chunks, 32):
        addresses = []
        for lane in range(32):
            row, col = divmod(min(first + lane, 16 * chunks - 1), chunks)
            addresses.append(row * rows.stride + (col ^ (row & swizzle)) * C.VECTOR_BYTES)
        total += _wavefronts(addresses)
    return total


@pytest.mark.parametrize("block_len", C.BLOCK_LENS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("tiles", [1, 2, 4, 8])
def test_lane_reads_of_a_stage_stay_off_each_others_banks(block_len: int, dtype: str, tiles: int) -> None:
    """Rows a lane reads in two or four 16-byte accesses are swizzled so that every access of a quarter-warp
    hits distinct banks (without it, 2-way conflicts: run 102's plain backward had 39% of its shared-load
    wavefronts in conflicts); the copies into the stage keep their wavefronts; eight accesses keep their
    2-way conflicts (no XOR of the row helps them)."""
    rec = default_spec(block_len=block_len, input_dtype=dtype, gate_dtype=dtype, output_dtype="fp32",
                       gate_layout="per_channel").recurrence  # fmt: skip
    for direction in ("fwd", "bwd"):
        lay = layout(direction, rec, tiles_in_flight=tiles, warps_per_cta=1, stages=2)
        streams = dict(lay.streams, out=lay.out) if lay.out.count else dict(lay.streams)  # bwd: no dx buffer
        if lay.dy_ring is not None:
            streams["dy"] = lay.dy_ring
        for name, rows in streams.items():
            dtype_of = "fp32" if name == "dy" or (name, direction) == ("out", "fwd") else dtype  # y, dy: fp32
            bytes_per = C.DTYPE_BYTES[dtype_of]
            lane_chunks = block_len // 2 * bytes_per // C.VECTOR_BYTES
            chunks = rows.copy // C.VECTOR_BYTES
            assert rows.swizzle == 0 or chunks % (rows.swizzle + 1) == 0  # positions stay inside the row
            if (name, direction) == ("a", "bwd"):  # the gates' extra chunk: not whole groups, not swizzled
                assert rows.swizzle == 0
                continue
            reads = _lane_reads(rows, lane_chunks, block_len, bytes_per)
            ideal = 4 if lane_chunks < 8 else 8
            assert reads == [ideal] * lane_chunks, (direction, name, reads)
            if lane_chunks in (2, 4):  # the swizzle is what gets there
                assert _lane_reads(dataclasses.replace(rows, swizzle=0), lane_chunks, block_len, bytes_per) != reads
            assert _copies(rows, rows.swizzle) <= _copies(rows, 0)


def test_the_source_takes_each_streams_swizzle() -> None:
    spec = default_spec(window_blocks=2).replace_target(staging="shared", tiles_in_flight=4)  # fp32 y and dy
    lays = spec_layouts(spec.recurrence, spec.target)
    dy, y = lays["bwd"].dy_ring or lays["bwd"].streams["dy"], lays["fwd"].out
    assert dy.swizzle == 1 and y.swizzle == 1 and lays["bwd"].streams["x"].swizzle == 0  # bf16 x: one access
    source = render_source(spec)
    assert f"using BwdStageD = StagedRows<out_t, 16, {dy.copy}, {dy.stride}, {dy.offset}, 1>;" in source
    assert f"using FwdOutY = StagedRows<out_t, 16, {y.copy}, {y.stride}, {y.offset}, 1>;" in source


@pytest.mark.parametrize("out", ["fp32", "bf16"])
def test_the_dy_ring_follows_the_output_dtype(out: str) -> None:
    """dy waits in one ring or in each stage as constants.BWD_DY_RING says for its dtype; the ring holds the
    stages' tiles and the halo, and the source gets the ring's rows."""
    spec = default_spec(window_blocks=3, output_dtype=out).replace_target(staging="shared", tiles_in_flight=4, stages=3)
    lay = spec_layouts(spec.recurrence, spec.target)["bwd"]
    source = render_source(spec)
    if C.BWD_DY_RING[out]:
        ring = lay.dy_ring
        assert ring.copy == (3 * 4 + 2) * 16 * C.DTYPE_BYTES[out] and "dy" not in lay.streams
        assert "constexpr bool kDyRing = true;" in source
        rows = f"{ring.copy}, {ring.stride}, {ring.offset}, {ring.swizzle}"
        assert f"using BwdStageD = StagedRows<out_t, 16, {rows}>;" in source
    else:
        assert lay.dy_ring is None and lay.streams["dy"].copy == (4 + 2) * 16 * C.DTYPE_BYTES[out]
        assert "constexpr bool kDyRing = false;" in source
    assert kernel_shared_bytes(spec)["swr_bwd_vec"] == lay.cta_bytes
