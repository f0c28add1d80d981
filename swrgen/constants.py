"""Single source of truth for constants shared by Python and the CUDA templates.

Everything here that a kernel depends on is passed to the Jinja templates by
``swrgen.codegen.render`` (see ``template_constants``), so Python and CUDA never
disagree about the tile geometry or the allowed values.
"""

from __future__ import annotations

# --- Kernel geometry (fixed by the template design; see templates/swr_common.cuh.j2) ---
WARP_SIZE = 32
CHANNELS_PER_WARP = 16  # one warp holds 16 channels of one head ...
LANES_PER_TILE = 2  # ... and each 16-token tile is split over a pair of lanes
VECTOR_BYTES = 16  # widest per-lane global access (LDG.128 / STG.128)
# Streamed inputs (read once) can be loaded with an L2 prefetch-size hint so DRAM serves whole
# 256-byte runs of a row instead of 32-byte sectors scattered over 16 rows; 0 disables the hint.
L2_PREFETCH_BYTES = 0  # 256 measured slower on H100 (44% vs 58% of floor, bench/RESULTS.md runs 4 and 33)
# Inputs read twice (the backward's look-ahead dy and its gates: the second read should hit L1) keep
# L1 allocation and take the prefetch hint: 1-2% faster backward on H100 (bench/RESULTS.md run 33).
REREAD_L2_PREFETCH_BYTES = 256
# The fused kernels' 16-byte loads of P and dZ blocks (16 token rows x 32 bytes of one head) take an L2
# prefetch-size hint: the rest of each line holds the neighbouring heads' bytes, which other warps read at
# about the same time. H200, bench/results/log.md run 69: fused forward -10% at the spec's target, -3% at
# the tuned one, backward -0.5%; 128 and 256 alike. 0 disables the hint.
FUSED_L2_PREFETCH_BYTES = 128
# The fused forward's CTA loads (templates/phalanx.cuh.j2): with heads a multiple of warps_per_cta, the CTA
# moves each token row's run of its W heads' blocks (W x 32 bytes) and gate logits (2W bytes) together,
# through shared tiles, instead of each warp 16 rows of its own. The warp's own loads kept the L1 data pipe
# 88% busy (a load of 16 rows touches 16 lines; DRAM 64%). H200, bench/results/log.md runs 97-105: fused
# forward 0.179 -> 0.149 ms (72% -> 86% of the floor) at the spec's target, outputs identical; the stores of
# the shared tiles need the bank skew between warps' tiles (without it, runs 97-98, CTA loads gained
# nothing). The backward keeps its warps' own loads (CTA loads there: 1.4% slower, run 103).
# False: every warp moves its own head's rows.
FUSED_CTA_LOADS = True
# target.staging: where a warp's loads wait before the math (layout: swrgen/spec/staging.py).
# registers: ld.global straight into registers, double-buffered (the backward caps at 2 tiles in flight).
# shared: cp.async copies of whole row runs into a per-warp ring of target.stages shared-memory stages
#         (one being read while the others load), outputs stored back as whole row runs.
STAGINGS = ("registers", "shared")
STAGE_COUNTS = (2, 3, 4)  # registers staging double-buffers: 2
# Shared staging may also store outputs through shared memory as whole row runs: the forward's y gains
# 3-10% that way, the backward's dx loses 2-12% (its buffer costs occupancy; bench/RESULTS.md runs 39-41).
STAGE_OUTPUTS = {"fwd": True, "bwd": False}
# Shared staging, backward: a batch's dy starts window_blocks - 1 tiles before its steps (the tiles it finishes
# were the previous batch's look-ahead). True (by output dtype, which dy has): a warp's dy tiles wait in one ring
# of stages x tiles_in_flight + window_blocks - 1 tiles, each copied once; False: each stage copies its batch's
# window, those k - 1 tiles twice (L2 re-reads). H200, bench/results/log.md run 110: fp32 dy 1-4% faster
# (k=2 8K-32K 0.0884 -> 0.0872 / 0.0888 -> 0.0868 ms, k=3 W=1 -3 to -4%); bf16 dy 10-13% slower (the ring's
# addressing took the bf16-out backward from 120-128 to 163 registers: a CTA of 4 warps fewer an SM).
BWD_DY_RING = {"fp32": True, "bf16": False, "fp16": False}
# The backward's look-ahead scans tile n in reverse for its carrier; tile n is finished k-1 steps later.
# For window_blocks k up to this (1: never), that scan waits in registers (16 a lane for each of the k-1
# tiles in between) instead of being made again: plain kernels "swr", fused "phalanx" (which also keeps
# the tile's dZ and skips reloading dZ and C). The values are the same bit for bit either way. H200,
# bench/results/log.md run 63: the fused backward at k=2 -16%; the plain one +0.6% (k=2 fp32, 8K) to -3%
# (bf16, 2K) at k=2 and +15% at k=3 (its registers cost a CTA an SM).
KEEP_LOOKAHEAD_SCANS = {"swr": 1, "phalanx": 2}
SHARED_BANK_BYTES = 128  # 32 banks x 4 bytes
SHARED_ROW_SKEW = 32  # staged row strides are this far past a multiple of SHARED_BANK_BYTES
# Dynamic shared memory a CTA may opt in to (CUDA C++ Programming Guide, compute capabilities table).
MAX_SHARED_BYTES_PER_CTA = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448,
                            "sm_90a": 232448, "sm_100a": 232448, "sm_120": 101376}  # fmt: skip
DEFAULT_DYNAMIC_SHARED_BYTES = 48 * 1024  # above this a kernel must opt in (cuFuncSetAttribute)
DECODE_THREADS = 256  # threads per CTA of the decode kernels (one thread per sequence, head and channel)

# --- Allowed spec values ---
HEAD_DIMS = (16, 32, 64)
BLOCK_LENS = (16, 32, 64)
MAX_WINDOW_BLOCKS = 8
GATE_LAYOUTS = ("per_head", "per_channel")
DTYPES = ("bf16", "fp16", "fp32")
ACCUM_DTYPES = ("fp32",)
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100a", "sm_120")
CLUSTER_ARCHS = ("sm_90", "sm_90a", "sm_100a", "sm_120")  # thread-block clusters exist
WARPS_PER_CTA = (1, 2, 4, 8, 16, 32)
TILES_IN_FLIGHT = (1, 2, 4, 8, 16)  # 16: staging 'shared' only (the register budget below)
CLUSTER_SIZES = (1, 2, 4, 8)  # 8 is the portable maximum
# target.min_warps_per_sm: asks ptxas (__launch_bounds__ minimum CTAs) to fit this many warps of the
# vector kernels on one SM, capping their registers (0: no request). Spills can cost more than it gains.
MIN_WARPS_PER_SM = (0, 8, 12, 16, 24, 32)
MAX_TILES_PER_WARP = 1 << 16
# The kernels index a sequence's tokens (positions, tiles) in 32 bits (tok_t): cheaper compares and fewer
# registers than 64-bit ones. A row of L tokens must leave room for a chunk's reach past its end
# (tiles_per_warp x block_len, the window's look-ahead), so L is capped below 2^31 by that much.
MAX_SEQUENCE_TOKENS = (1 << 31) - (1 << 23)
# How a carrier (a tile's last local state and gate product) crosses each level.
# registers: kept in a rolling register window inside one warp's chunk of tiles.
# halo: recomputed by re-reading the window_blocks-1 tiles before the chunk, so no
#       level ever waits on another (works on every architecture).
WARP_CARRIERS = ("registers",)
CTA_CARRIERS = ("halo",)
CLUSTER_CARRIERS = ("halo",)
# Per-lane register budget of staging 'registers': tokens per lane times tiles in flight must stay
# under this or the loads spill to local memory (shared staging holds them in shared memory instead).
MAX_TOKENS_IN_FLIGHT_PER_LANE = 64

# C++ type and size of each dtype name.
CUDA_TYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def tokens_per_lane(block_len: int) -> int:
    return block_len // LANES_PER_TILE


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def dtype_name(dtype) -> str:
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise TypeError(f"unsupported dtype {dtype}; allowed: torch.bfloat16, torch.float16, torch.float32")
    return names[dtype]
