"""Where every rank's slice lies, agreed by all ranks of a context-parallel group, and what crosses its edges.

Rank r of a group of W ranks holds tokens ``[offsets[r], offsets[r+1])`` of every sequence (dense: each
batch entry is one sequence of ``offsets[W]`` tokens; packed: ``cu_seqlens`` in global offsets, one buffer
of ``offsets[W]`` tokens). The offsets come from one all-gather of the slice lengths (:func:`agree`), which
also carries everything the ranks must agree on (shapes, dtypes, window, the ``cu_seqlens`` digest,
whether autograd records the call) and every rank's local validation error: a problem on one rank is
raised on every rank, with the same message, instead of leaving its peers waiting for a message.

:func:`slice_plan` turns the layout into one rank's plan: its pieces (the parts of sequences in its slice)
and their positions, whether a state comes in from rank r-1 (``recv``) and goes out to rank r+1
(``send``), and whether the slice is *short* (the state it sends depends on the state it receives).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ContextParallelError", "SliceLayout", "SlicePlan", "agree", "cu_digest", "slice_plan"]


class ContextParallelError(ValueError):
    """The ranks of a context-parallel group disagree, or one of them got arguments it cannot run (raised
    on every rank of the group with the same message)."""


# The fields every call exchanges, one int64 each; all but "length" must agree across ranks.
FIELDS = ("kind", "length", "batch", "heads", "head_dim", "gates", "window_blocks", "block_len", "dtype",
          "gate_dtype", "out_dtype", "sequences", "total", "cu_digest", "grad", "device", "decay_max")  # fmt: skip
_FLAG = len(FIELDS)  # one more entry: 1 when this rank's local checks failed

_DTYPES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}


def dtype_code(dtype: torch.dtype | None) -> int:
    return 0 if dtype is None else _DTYPES.get(dtype, -1)


def float_code(value: float) -> int:
    """A float as the int64 of its bits (compared exactly across ranks)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def cu_digest(values: tuple[int, ...]) -> int:
    """A 63-bit digest of global ``cu_seqlens`` (ranks compare it instead of the whole list)."""
    raw = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take tensors: the CPU when it has a gloo backend (no device sync),
    else the current CUDA device."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree(group: dist.ProcessGroup, meta: dict[str, int] | None, error: str | None) -> list[dict[str, int]]:
    """All-gather every rank's ``meta`` (FIELDS) and validation error; raise ContextParallelError on every
    rank if any rank failed its checks or the ranks disagree on a field other than ``length``.

    Returns every rank's meta, in group rank order. One all_gather of a small int64 vector, plus one
    all_gather_object of the messages when some rank failed.
    """
    row = [0] * (_FLAG + 1)
    if meta is not None:
        row[:_FLAG] = [int(meta.get(name, 0)) for name in FIELDS]
    row[_FLAG] = 1 if error is not None else 0
    world = dist.get_world_size(group)
    device = collective_device(group)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).tolist()
    if any(r[_FLAG] for r in table):
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, error, group=group)
        failed = "; ".join(f"rank {i}: {m}" for i, m in enumerate(messages) if m is not None)
        raise ContextParallelError(f"context-parallel call rejected ({failed})")
    metas = [dict(zip(FIELDS, r[:_FLAG], strict=True)) for r in table]
    for name in FIELDS:
        if name == "length":
            continue
        values = [m[name] for m in metas]
        if len(set(values)) > 1:
            raise ContextParallelError(_disagreement(name, values))
    return metas


def _disagreement(name: str, values: list[int]) -> str:
    what = {
        "kind": "the op (0 = a cp_context, 1 = swr, 2 = phalanx_gating; every rank must make the same call)",
        "batch": "the batch size (every rank holds a slice of the same sequences)",
        "heads": "the number of heads", "head_dim": "head_dim",
        "gates": "the gate layout (1 = per head, else per channel) / kv_heads",
        "window_blocks": "window_blocks", "block_len": "block_len",
        "dtype": "the input dtype", "gate_dtype": "the gate dtype", "out_dtype": "the output dtype",
        "sequences": "the number of packed sequences (cu_seqlens must be the same global offsets on every rank)",
        "total": "the packed total (cu_seqlens[-1]; cu_seqlens must be the same global offsets on every rank)",
        "cu_digest": "cu_seqlens (must be the same global offsets on every rank)",
        "grad": "whether autograd records the call (every rank must run backward, or none)",
        "device": "the device type", "decay_max": "decay_max",
    }.get(name, name)  # fmt: skip
    per_rank = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
    return f"ranks of the context-parallel group disagree on {what}: {per_rank}"


@dataclass(frozen=True)
class SliceLayout:
    """The agreed layout: group ``rank`` of ``world``; ``offsets`` (world + 1 entries: rank r holds global
    tokens [offsets[r], offsets[r+1])); ``cu_seqlens``: global offsets of packed sequences, or None (dense)."""

    rank: int
    world: int
    offsets: tuple[int, ...]
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def start(self) -> int:
        return self.offsets[self.rank]

    @property
    def end(self) -> int:
        return self.offsets[self.rank + 1]

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @classmethod
    def from_lengths(cls, rank: int, lengths: list[int], cu_seqlens: tuple[int, ...] | None) -> SliceLayout:
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        if cu_seqlens is not None and cu_seqlens[-1] != offsets[-1]:
            per_rank = ", ".join(f"rank {i}: {n}" for i, n in enumerate(lengths))
            raise ContextParallelError(
                f"the slices do not add up to the packed sequences: cu_seqlens[-1] = {cu_seqlens[-1]} but the "
                f"ranks hold {offsets[-1]} tokens ({per_rank}); allowed: slices whose lengths sum to cu_seqlens[-1]"
            )
        return cls(rank, len(lengths), tuple(offsets), cu_seqlens)


@dataclass(frozen=True)
class SlicePlan:
    """One rank's part of a call (local token indices; positions are within each sequence).

    starts: local offsets of the pieces (packed; None for a dense slice). pos: each state row's position
    at the slice start (dense: one per batch entry; packed: one per piece). recv / send: a state crosses the
    slice's left / right edge. short: the outgoing state depends on the incoming one (the slice holds fewer
    than k-1 complete tiles after its first tile edge). head_end: the incoming state reaches outputs
    [0, head_end) only. tail_start / tail_pos: the outgoing state depends only on [tail_start, length),
    which starts at position tail_pos (a tile edge) of its sequence. rows: state rows per message.
    """

    length: int
    starts: tuple[int, ...] | None
    pos: tuple[int, ...]
    recv: bool
    send: bool
    short: bool
    head_end: int
    tail_start: int
    tail_pos: int
    rows: int


def _crossing(cu: tuple[int, ...], at: int) -> int | None:
    """The packed sequence s with cu[s] < at < cu[s+1], or None (a boundary, or outside)."""
    s = bisect.bisect_right(cu, at) - 1
    if 0 <= s < len(cu) - 1 and cu[s] < at < cu[s + 1]:
        return s
    return None


def slice_plan(layout: SliceLayout, batch: int, window_blocks: int, block_len: int) -> SlicePlan:
    k, bl = window_blocks, block_len
    o, e, length = layout.start, layout.end, layout.length
    if layout.cu_seqlens is None:
        recv, send = 0 < o < layout.total, 0 < e < layout.total
        seq_in = seq_out = 0  # start of the one sequence
        first_end = length  # where the piece of the incoming sequence ends (local)
        starts = None
        pos = (o,) * batch
        rows = batch
        same = recv and send
    else:
        cu = layout.cu_seqlens
        s_in, s_out = _crossing(cu, o), _crossing(cu, e)
        recv, send = s_in is not None, s_out is not None
        seq_in = cu[s_in] if recv else o
        seq_out = cu[s_out] if send else e
        first_end = min(cu[s_in + 1], e) - o if recv else 0
        same = recv and send and s_in == s_out
        local, pieces = [], []
        s = max(0, bisect.bisect_right(cu, o) - 1)
        while s < len(cu) - 1 and cu[s] < e:
            lo, hi = max(cu[s], o), min(cu[s + 1], e)
            if lo < hi:
                local.append(lo - o)
                pieces.append(lo - cu[s])
            s += 1
        starts = (*local, length) if local else (0, length)
        pos = tuple(pieces) if pieces else (o - seq_in,)
        rows = 1
    head_end = 0
    if recv:
        p = o - seq_in  # position of the slice start in its sequence
        head_end = min((-(-p // bl) + k - 1) * bl - p, first_end)
    tail_start = tail_pos = 0
    if send:
        p_end = e - seq_out
        tail_pos = max(0, (p_end // bl - (k - 1)) * bl)
        tail_start = seq_out + tail_pos - o
    short = same and tail_start < 0
    return SlicePlan(length, starts, pos, recv, send, short, head_end, tail_start, tail_pos, rows)
