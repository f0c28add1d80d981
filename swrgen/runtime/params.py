"""The kernels' one parameter: a struct passed by value.

This field list is the single source of truth for its layout: the template renders
it as a C struct (``templates/swr_params.cuh.j2``) and ``KernelParams`` mirrors it
with ctypes. Every field is 8 bytes, so C and ctypes agree without padding rules.
"""

from __future__ import annotations

import ctypes

# (name, C type). "ptr" fields are device addresses, "i64" fields are element counts or strides, "f64" reals.
PARAM_FIELDS: tuple[tuple[str, str], ...] = (
    ("x", "ptr"),  # inputs u            [B, H, DH, L]
    ("a", "ptr"),  # gates               [B, H, L] or [B, H, DH, L]
    ("y", "ptr"),  # forward output      [B, H, DH, L]
    ("dy", "ptr"),  # backward: grad of y
    ("dx", "ptr"),  # backward: grad of x
    ("da", "ptr"),  # backward: fp32 partial grad of a, contiguous [B, H, G, L] or [B, H, DH, L]
    ("len", "i64"),  # L: tokens per row of the buffers
    ("heads", "i64"),  # H
    ("rows", "i64"),  # B * H * (DH / 16): one row is 16 channels of one head
    ("tiles_per_warp", "i64"),  # chunk of tiles one warp owns (a tuning knob)
    ("chunks", "i64"),  # chunks per row (dense) or over all packed sequences (seq_start set)
    ("work", "i64"),  # warp work items: rows * chunks
    ("num_seqs", "i64"),  # packed sequences (seq_start set), else 0
    ("seq_start", "ptr"),  # int64 [S+1] token offset of each packed sequence, or null (dense batch)
    ("seq_chunk", "ptr"),  # int64 [S+1] cumulative chunk count of the packed sequences
    # Streaming state, per sequence s (batch entry, or packed sequence); N = B or S rows.
    ("pos", "ptr"),  # int64 [N'] tokens each sequence has seen (its phase: pos % BL), or null (all 0)
    ("state_index", "ptr"),  # int64 [N] row of sequence s in state and pos (slots of a pool), or null (s)
    ("state", "ptr"),  # float32 [N', H, DH, 2 + 2(k-1)] = (w, g, v.., P..) to continue from, or null
    ("state_out", "ptr"),  # float32 [N, H, DH, 2 + 2(k-1)]: the forward writes each new state, or null
    ("pos_out", "ptr"),  # int64 [N]: the forward writes pos + length, or null
    ("dstate", "ptr"),  # float32 like state_out: the backward writes the old state's gradient, or null
    ("dstate_out", "ptr"),  # float32 like state_out: the gradient of the new state (backward input), or null
    ("sxb", "i64"), ("sxh", "i64"), ("sxc", "i64"),
    ("sab", "i64"), ("sah", "i64"), ("sac", "i64"),
    ("syb", "i64"), ("syh", "i64"), ("syc", "i64"),
    ("sdyb", "i64"), ("sdyh", "i64"), ("sdyc", "i64"),
    ("sdxb", "i64"), ("sdxh", "i64"), ("sdxc", "i64"),
    # Fused Phalanx kernels (fused_gating): x = projections P [B, L, N] (unit channel stride) whose
    # columns hold A at col_a + h, B at col_b + kv * DH + c, C at col_c + kv * DH + c, V at
    # col_v + h * DH + c (kv = h / kv_group); y = Z [B, L, H * DH]; dy = dZ; dx = dP (P's layout);
    # dbc: fp32 [B, L, 2, H, DH] per-head dB, dC when kv_group > 1 (the host sums each group).
    ("decay_max", "f64"), ("kv_group", "i64"),
    ("col_a", "i64"), ("col_b", "i64"), ("col_c", "i64"), ("col_v", "i64"),
    ("spb", "i64"), ("spt", "i64"),  # P: batch, token strides
    ("sdpb", "i64"), ("sdpt", "i64"),  # dP
    ("szb", "i64"), ("szt", "i64"),  # Z
    ("sdzb", "i64"), ("sdzt", "i64"),  # dZ
    ("dbc", "ptr"),
)  # fmt: skip

C_TYPES = {"ptr": "const void*", "i64": "long long", "f64": "double"}
_CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "f64": ctypes.c_double}


class KernelParams(ctypes.Structure):
    _fields_ = [(name, _CTYPES[kind]) for name, kind in PARAM_FIELDS]


def template_fields() -> list[tuple[str, str]]:
    """(C type, name) pairs for the template's struct."""
    return [(C_TYPES[kind], name) for name, kind in PARAM_FIELDS]
