"""Shared-memory layout of ``target.staging: shared`` (the one source for Python and the templates).

With shared staging a warp copies the rows it is about to read into its own ring of ``target.stages``
shared-memory stages with cp.async: consecutive lanes take consecutive 16-byte chunks of one row, so
every load instruction reads whole runs of a row rather than 16 rows x 32 bytes, and nothing waits in
registers. A stage holds ``tiles_in_flight`` tiles of each stream:

- forward: x (16 channel rows) and the gates (1 row per head, or 16 per channel);
- backward: x, and dy and the gates starting ``window_blocks - 1`` tiles earlier (the tiles the
  step finishes, besides the tiles it looks ahead at), the gates one 16-byte chunk longer (the first
  gate of the next tile). Where ``constants.BWD_DY_RING`` says so for dy's dtype, dy is not in the
  stages but in one ring a warp after them (``Layout.dy_ring``) of ``stages * tiles_in_flight +
  window_blocks - 1`` tiles, so the tiles consecutive batches share are copied once.

Where ``constants.STAGE_OUTPUTS`` says so (the forward's y; the backward's dx measured slower), the
outputs of a batch go the same way back: lanes write their half-tiles into one output buffer per warp,
then the warp stores whole runs of each row. Without it the buffer has no rows. Where y is as wide as x
(bf16 in, bf16 out) there is no buffer: a lane writes its y over the x it has just read, in the stage.

Row strides are padded to 32 bytes past a multiple of 128, so the four rows that one quarter-warp
reads from shared memory fall in different banks. A lane reads its half-tile as 16-byte accesses;
where that takes two or more, the stride alone cannot keep a quarter-warp off shared banks (lane
(c, odd) and lane (c + 1, even) meet at every access: 2-way conflicts), so such rows are *swizzled*:
chunk ``col`` of row ``r`` sits at ``col ^ (r & swizzle)``. The templates receive these numbers and
``static_assert`` what they rely on; launches pass ``cta_bytes`` as dynamic shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from swrgen import constants as C


def padded_stride(row_bytes: int) -> int:
    """Smallest 16-byte multiple >= row_bytes that is 32 past a multiple of 128 (no bank conflicts)."""
    stride = -(-row_bytes // C.VECTOR_BYTES) * C.VECTOR_BYTES
    while stride % C.SHARED_BANK_BYTES != C.SHARED_ROW_SKEW:
        stride += C.VECTOR_BYTES
    return stride


def lane_swizzle(copy_bytes: int, lane_bytes: int) -> int:
    """XOR mask of a row's 16-byte chunk positions (0: none) for lanes reading ``lane_bytes`` at a time.

    K = lane_bytes / 16 chunks a lane: ``col ^ (row & (min(K, 4) - 1))`` permutes each aligned group of K
    chunks, which puts every access of a quarter-warp (4 rows x 2 half-tiles) on distinct banks for K = 2
    and 4 (K = 8 keeps its 2-way conflicts either way) and leaves the copies' runs of whole groups on the
    banks they had. A row that is not whole groups (the gates' extra chunk) is not swizzled: the XOR could
    leave it.
    """
    k = lane_bytes // C.VECTOR_BYTES
    if k < 2 or (copy_bytes // C.VECTOR_BYTES) % k:
        return 0
    return min(k, 4) - 1


@dataclass(frozen=True)
class Rows:
    """One stream's rows in a stage: ``count`` rows of ``copy`` bytes at ``stride`` bytes, from ``offset``;
    chunk positions XOR ``swizzle`` (``lane_swizzle``)."""

    count: int
    copy: int
    stride: int
    offset: int
    swizzle: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.count * self.stride


@dataclass(frozen=True)
class Layout:
    """A warp's stage ring (``stages`` x ``stage_bytes``) and output buffer (``out_bytes``) for one kernel
    direction; ``cta_bytes`` is the launch's dynamic shared memory."""

    streams: dict[str, Rows]  # inside each stage
    out: Rows  # after the stages (and dy's ring), once per warp; or, with out_in_stage, x's place in the stage
    stage_bytes: int
    stages: int
    warps: int
    out_in_stage: bool = False
    dy_ring: Rows | None = None  # backward with BWD_DY_RING: dy's tiles, one ring after the stages

    @property
    def out_bytes(self) -> int:
        """Shared memory of the output buffer (none when it is the stage itself)."""
        return 0 if self.out_in_stage else self.out.count * self.out.stride

    @property
    def ring_bytes(self) -> int:
        return 0 if self.dy_ring is None else self.dy_ring.end - self.dy_ring.offset

    @property
    def warp_bytes(self) -> int:
        return self.stage_bytes * self.stages + self.ring_bytes + self.out_bytes

    @property
    def cta_bytes(self) -> int:
        return self.warp_bytes * self.warps


def _stack(parts: list[tuple[str, int, int, int]]) -> tuple[dict[str, Rows], int]:
    streams: dict[str, Rows] = {}
    offset = 0
    for name, count, copy, lane in parts:
        rows = Rows(count=count, copy=copy, stride=padded_stride(copy), offset=offset, swizzle=lane_swizzle(copy, lane))
        streams[name] = rows
        offset = rows.end
    return streams, offset


def layout(direction: str, recurrence, tiles_in_flight: int, warps_per_cta: int, stages: int) -> Layout:
    """The shared-memory layout of the "fwd" or "bwd" vector kernel (one warp: 16 channels of one head).

    ``recurrence`` is a spec's Recurrence (duck-typed: the schema imports this module).
    """
    r = recurrence
    rows = C.CHANNELS_PER_WARP  # whatever the head size, a warp holds 16 channels
    gate_rows = rows if r.gate_layout == "per_channel" else 1
    tile = {name: r.block_len * C.DTYPE_BYTES[dtype] for name, dtype in
            (("x", r.input_dtype), ("y", r.output_dtype), ("a", r.gate_dtype))}  # fmt: skip
    lane = {name: nbytes // C.LANES_PER_TILE for name, nbytes in tile.items()}  # a lane's half-tile
    tiles, halo = tiles_in_flight, r.window_blocks - 1
    dy_in_ring = direction == "bwd" and C.BWD_DY_RING[r.output_dtype]
    if direction == "fwd":
        parts = [("x", rows, tiles * tile["x"], lane["x"]), ("a", gate_rows, tiles * tile["a"], lane["a"])]
        out = ("y", rows, tiles * tile["y"], lane["y"])
    elif direction == "bwd":
        parts = [
            ("x", rows, tiles * tile["x"], lane["x"]),
            *([] if dy_in_ring else [("dy", rows, (tiles + halo) * tile["y"], lane["y"])]),
            ("a", gate_rows, (tiles + halo) * tile["a"] + C.VECTOR_BYTES, lane["a"]),
        ]
        out = ("dx", rows, tiles * tile["x"], lane["x"])
    else:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    streams, stage_bytes = _stack(parts)
    dy_ring = None
    if dy_in_ring:  # dy's own ring after the stages: stages x tiles + the halo tiles
        copy = (stages * tiles + halo) * tile["y"]
        dy_ring = Rows(count=rows, copy=copy, stride=padded_stride(copy), offset=stage_bytes * stages,
                       swizzle=lane_swizzle(copy, lane["y"]))  # fmt: skip
    after = stage_bytes * stages if dy_ring is None else dy_ring.end
    # y as wide as x: each lane writes its y vector over the x vector it has just read, in the stage.
    in_stage = direction == "fwd" and C.STAGE_OUTPUTS["fwd"] and out[2] == parts[0][2]
    if in_stage:
        out_rows = streams["x"]
    else:
        out_count = out[1] if C.STAGE_OUTPUTS[direction] else 0
        out_rows = Rows(count=out_count, copy=out[2], stride=padded_stride(out[2]), offset=after,
                        swizzle=lane_swizzle(out[2], out[3]))
    return Layout(streams=streams, out=out_rows, stage_bytes=stage_bytes, stages=stages, warps=warps_per_cta,
                  out_in_stage=in_stage, dy_ring=dy_ring)  # fmt: skip


def spec_layouts(recurrence, target) -> dict[str, Layout]:
    """Both directions' layouts for a spec's recurrence and target."""
    t = target
    return {d: layout(d, recurrence, t.tiles_in_flight, t.warps_per_cta, t.stages) for d in ("fwd", "bwd")}


def max_shared_bytes(archs: tuple[str, ...]) -> int:
    """The dynamic shared memory one CTA may use on every arch in ``archs``."""
    return min(C.MAX_SHARED_BYTES_PER_CTA[a] for a in archs)
