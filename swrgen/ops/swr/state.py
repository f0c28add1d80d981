"""Streaming state of the SWR: prefill a chunk, continue with another, decode one token at a time.

Semantics (docs/semantics.md), ``k = window_blocks``, ``BL = block_len``, tile ``i = t // BL``::

    y_t = sum_{s = max(0, (i-k+1)*BL) .. t} ( prod_{q=s+1..t} a_q ) * u_s

Tiles are aligned to each sequence's position 0. With the tile-local (zero-initialised) scan
``w_t = a_t w_{t-1} + u_t`` and inclusive gate product ``g_t`` of tile ``i``, and the carriers
``v_j`` / ``P_j`` (``w`` / ``g`` at the last token of complete tile ``j``), the output is
``y_t = w_t + g_t * C_i`` with the Horner carry ``C_i = v_{i-1} + P_{i-1} (v_{i-2} + ... + P_{i-k+2} v_{i-k+1})``
(``C_i = 0`` for ``k = 1``; carriers of tiles before the sequence start are 0).

So everything a continuation needs after ``pos`` tokens is, per channel (:class:`SwrState`, one row per
sequence): ``w``, ``g`` of the current, partial tile ``pos // BL`` after its first ``pos % BL`` tokens
(``w = 0``, ``g = 1`` at a tile boundary) and the carriers ``v_{n-1..n-k+1}``, ``P_{n-1..n-k+1}`` of the
complete tiles before it, newest first. ``P`` is stored per channel even for per-head gates. That is
``2 + 2(k-1)`` numbers per channel, independent of the sequence length, held in one tensor in the layout
the GPU kernels read and write: ``data [N, H, DH, 2 + 2(k-1)] = [w, g, v_1..v_{k-1}, P_1..P_{k-1}]``.
Each sequence has its own position (``pos``, int64 ``[N]`` on the state's device), so one call can
continue sequences that are at different positions, with no host synchronisation.

The state is differentiable: gradients flow into ``data`` (and from it, through the ops that made it).

Reference functions (float64, differentiable, any device): :func:`swr_with_state` (a continued chunk),
:func:`final_state` (the state after a chunk: O(k*BL) per row), :func:`decode_step` (one token for a
batch, per-sequence positions, no host sync, one CUDA graph serves every position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from swrgen.ops.swr.reference import check_swr_args

__all__ = ["SwrState", "decode_step", "final_state", "state_width", "swr_with_state"]


def state_width(window_blocks: int) -> int:
    """Numbers per channel in a state: ``w, g`` and ``k-1`` carriers ``(v, P)``."""
    return 2 + 2 * (window_blocks - 1)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class SwrState:
    """SWR state of ``N`` sequences (batch entries, or packed sequences), each after ``pos[n]`` tokens.

    ``data``: floating ``[N, H, DH, 2 + 2(k-1)]`` = ``[w, g, v_1..v_{k-1}, P_1..P_{k-1}]`` (float32 for the
    GPU kernels; float64 keeps the CPU reference exact). ``pos``: int64 ``[N]`` on ``data``'s device.
    ``block_len``: the tile length it was built with (checked on use). ``host_pos``: the positions as the
    host knows them, when it does (None after a decode step on the device); only a hint the GPU launcher
    uses to pick 16-byte kernels, never the truth.
    """

    __slots__ = ("block_len", "data", "host_pos", "pos")

    def __init__(self, data: torch.Tensor, pos: torch.Tensor | int | Sequence[int], block_len: int,
                 host_pos: tuple[int, ...] | None = None) -> None:  # fmt: skip
        self.block_len = _positive_int("SwrState.block_len", block_len)
        if not isinstance(data, torch.Tensor) or not data.is_floating_point():
            raise TypeError(f"SwrState.data must be a floating-point tensor; got {type(data).__name__}"
                            + (f" of {data.dtype}" if isinstance(data, torch.Tensor) else ""))  # fmt: skip
        if data.dim() != 4 or data.shape[-1] < 2 or data.shape[-1] % 2:
            raise ValueError(f"SwrState.data must be [N, H, DH, 2 + 2(k-1)] (w, g, carriers); got {list(data.shape)}")
        n = data.shape[0]
        if not isinstance(pos, torch.Tensor):
            values = [pos] * n if isinstance(pos, int) else list(pos)
            for v in values:
                _positive_int("SwrState.pos", v, 0)
            if host_pos is None:
                host_pos = tuple(values)
            pos = torch.tensor(values, dtype=torch.int64, device=data.device)
        if pos.dtype != torch.int64 or pos.shape != (n,):
            raise ValueError(f"SwrState.pos must be int64 [N] = [{n}]; got {pos.dtype} {list(pos.shape)}")
        if pos.device != data.device:
            raise ValueError(f"SwrState.pos is on {pos.device} but its data on {data.device}")
        if host_pos is not None and len(host_pos) != n:
            raise ValueError(f"SwrState.host_pos must have N = {n} entries; got {len(host_pos)}")
        self.data, self.pos, self.host_pos = data, pos, host_pos

    # ------------------------------------------------------------ construction

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int, window_blocks: int,
              device: torch.device | str | None = None, *, block_len: int = 16, dtype: torch.dtype = torch.float32,
              pos: int = 0) -> SwrState:  # fmt: skip
        """The state before the first token (``w = 0``, ``g = 1``, zero carriers) of ``batch`` sequences.

        ``pos`` must be a multiple of ``block_len`` (a fresh tile): a sequence that starts at a later tile.
        """
        for name, v in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("window_blocks", window_blocks)):
            _positive_int(name, v)
        _positive_int("block_len", block_len)
        if _positive_int("pos", pos, 0) % block_len:
            raise ValueError(f"a zero state starts a tile: pos must be a multiple of block_len={block_len}; got {pos}")
        data = torch.zeros(batch, heads, head_dim, state_width(window_blocks), device=device, dtype=dtype)
        data[..., 1] = 1.0
        return cls(data, pos, block_len)

    @classmethod
    def from_parts(cls, pos, carry_v: torch.Tensor, carry_p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                   block_len: int) -> SwrState:  # fmt: skip
        """From ``w, g [N, H, DH]`` and newest-first carriers ``carry_v, carry_p [N, H, DH, k-1]``."""
        for name, t in (("carry_v", carry_v), ("carry_p", carry_p), ("w", w), ("g", g)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"SwrState.{name} must be a floating-point tensor; got {type(t).__name__}")
        if w.dim() != 3:
            raise ValueError(f"SwrState.w must be [N, H, DH]; got shape {list(w.shape)}")
        if g.shape != w.shape:
            raise ValueError(f"SwrState.g must have w's shape {list(w.shape)}; got {list(g.shape)}")
        for name, t in (("carry_v", carry_v), ("carry_p", carry_p)):
            if t.dim() != 4 or t.shape[:3] != w.shape:
                raise ValueError(f"SwrState.{name} must be [N, H, DH, k-1] with [N, H, DH] = {list(w.shape)}; "
                                 f"got {list(t.shape)}")  # fmt: skip
        if carry_p.shape != carry_v.shape:
            raise ValueError(f"SwrState.carry_p must have carry_v's shape {list(carry_v.shape)}; "
                             f"got {list(carry_p.shape)}")  # fmt: skip
        data = torch.cat([w.unsqueeze(-1), g.unsqueeze(-1), carry_v, carry_p], dim=-1)
        return cls(data, pos, block_len)

    # ------------------------------------------------------------ views

    @property
    def window_blocks(self) -> int:
        return self.data.shape[-1] // 2

    @property
    def w(self) -> torch.Tensor:
        return self.data[..., 0]

    @property
    def g(self) -> torch.Tensor:
        return self.data[..., 1]

    @property
    def carry_v(self) -> torch.Tensor:
        return self.data[..., 2 : 2 + self.window_blocks - 1]

    @property
    def carry_p(self) -> torch.Tensor:
        return self.data[..., 2 + self.window_blocks - 1 :]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, H, DH)``."""
        return tuple(self.data.shape[:3])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def positions(self) -> list[int]:
        """Every sequence's position on the host (reads the device for a CUDA state without ``host_pos``)."""
        return list(self.host_pos) if self.host_pos is not None else self.pos.tolist()

    def packed(self) -> torch.Tensor:
        """Contiguous float32 ``data`` (the GPU layout); no copy when it already is."""
        return self.data.to(torch.float32).contiguous()

    # ------------------------------------------------------------ copies

    def _with(self, data: torch.Tensor, pos: torch.Tensor) -> SwrState:
        return SwrState(data, pos, self.block_len, self.host_pos)

    def clone(self) -> SwrState:
        return self._with(self.data.clone(), self.pos.clone())

    def detach(self) -> SwrState:
        return self._with(self.data.detach(), self.pos)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SwrState:
        return self._with(self.data.to(device=device, dtype=dtype), self.pos.to(device=device))

    def select(self, index: torch.Tensor) -> SwrState:
        """The states of sequences ``index`` (int64 [M]; e.g. slots of a serving pool)."""
        host = None if self.host_pos is None or index.is_cuda else tuple(self.host_pos[i] for i in index.tolist())
        return SwrState(self.data.index_select(0, index), self.pos.index_select(0, index), self.block_len, host)

    def check(self, n: int, heads: int, head_dim: int, window_blocks: int, block_len: int) -> None:
        """Raise ValueError unless this state fits ``n`` sequences of ``[heads, head_dim]`` and the window."""
        if self.window_blocks != window_blocks:
            raise ValueError(
                f"state was built for window_blocks={self.window_blocks} (carry of {self.window_blocks - 1} tiles) "
                f"but the call has window_blocks={window_blocks}; allowed: a state from the same window"
            )
        if self.block_len != block_len:
            raise ValueError(f"state was built for block_len={self.block_len} but the call has "
                             f"block_len={block_len}; allowed: a state from the same block_len")  # fmt: skip
        if tuple(self.data.shape[:3]) != (n, heads, head_dim):
            raise ValueError(
                f"state has [N, H, DH] = {list(self.data.shape[:3])} but the call has {[n, heads, head_dim]} "
                "(N: batch entries, or packed sequences with cu_seqlens); allowed: a state of the same N, heads "
                "and head_dim"
            )

    def __repr__(self) -> str:
        n, h, dh = self.data.shape[:3]
        return (f"SwrState(N={n}, H={h}, DH={dh}, window_blocks={self.window_blocks}, "
                f"block_len={self.block_len}, {self.dtype}, {self.device})")  # fmt: skip


# ---------------------------------------------------------------- reference helpers


def _check_state(state: SwrState | None, x: torch.Tensor, window_blocks: int, block_len: int) -> None:
    if state is None:
        return
    if not isinstance(state, SwrState):
        raise TypeError(f"state must be a SwrState or None; got {type(state).__name__}")
    B, H, DH = x.shape[:3]
    state.check(B, H, DH, int(window_blocks), int(block_len))
    if state.device != x.device:
        raise ValueError(f"state is on {state.device} but x is on {x.device}")


def _horner(carry_v: torch.Tensor, carry_p: torch.Tensor) -> torch.Tensor:
    """Carry into the current tile from the newest-first carriers: ``v_1 + p_1 (v_2 + p_2 (... v_{k-1}))``."""
    km1 = carry_v.shape[-1]
    C = carry_v.new_zeros(carry_v.shape[:-1])
    for j in range(km1 - 1, -1, -1):
        C = carry_v[..., j] + carry_p[..., j] * C
    return C


def _scan_tiles(a: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, g0: torch.Tensor, phase: int, first_tile: int,
                block_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Tile-local scans of a chunk that starts ``phase`` tokens into a tile, in float64.

    Chunk token ``t`` sits at tile position ``phase + t`` (tile 0 is the partial tile the chunk continues).
    Returns ``(w, g)`` ``[B, H, DH, n, BL]`` for tiles ``first_tile .. ceil((phase+L)/BL)-1``; tile 0 starts
    from ``(w0, g0)`` when ``phase > 0`` (its first ``phase`` slots and the slots past the chunk end are
    padding with a = 1, u = 0, so the scan carries (w, g) through them unchanged), every other tile from
    ``(0, 1)``.
    """
    BL = block_len
    L = x.shape[-1]
    nt = -(-(phase + L) // BL)
    lo = first_tile * BL - phase  # chunk index of the first slot of `first_tile` (negative: padding)
    left = max(0, -lo)
    right = nt * BL - phase - L
    a4 = (a.unsqueeze(2) if a.dim() == 3 else a).to(torch.float64)
    u = x.to(torch.float64)
    a_s = F.pad(a4[..., max(lo, 0) :], (left, right), value=1.0)
    u_s = F.pad(u[..., max(lo, 0) :], (left, right), value=0.0)
    n = nt - first_tile
    a_s = a_s.reshape(*a_s.shape[:-1], n, BL)
    u_s = u_s.reshape(*u_s.shape[:-1], n, BL)
    shape = (*x.shape[:3], n)
    w = torch.zeros(shape, dtype=torch.float64, device=x.device)
    g = torch.ones(shape, dtype=torch.float64, device=x.device)
    if first_tile == 0 and phase > 0:  # the partial tile continues from (w0, g0); at a tile start they are unused
        w = torch.cat([w0.to(torch.float64).unsqueeze(-1), w[..., 1:]], dim=-1)
        g = torch.cat([g0.to(torch.float64).unsqueeze(-1), g[..., 1:]], dim=-1)
    # A fresh tile's scan starts at its first token (w = u, g = a): a gate never multiplies the zero before
    # it. The continued tile 0 starts from (w0, g0) before its first slot.
    fresh = torch.ones(n, dtype=torch.bool, device=x.device)
    if first_tile == 0 and phase > 0:
        fresh[0] = False
    ws, gs = [], []
    for r in range(BL):
        if r == 0:
            w = torch.where(fresh, u_s[..., 0], a_s[..., 0] * w + u_s[..., 0])
            g = torch.where(fresh, a_s[..., 0].expand_as(g), a_s[..., 0] * g)
        else:
            w = a_s[..., r] * w + u_s[..., r]
            g = a_s[..., r] * g
        ws.append(w)
        gs.append(g)
    return torch.stack(ws, dim=-1), torch.stack(gs, dim=-1)


def _groups_by_phase(state: SwrState) -> list[tuple[int, torch.Tensor]]:
    """(phase, batch indices) of the sequences that share a phase (the reference scans each group at once)."""
    phases = [p % state.block_len for p in state.positions()]
    out = []
    for ph in sorted(set(phases)):
        idx = [i for i, p in enumerate(phases) if p == ph]
        out.append((ph, torch.tensor(idx, dtype=torch.int64, device=state.device)))
    return out


def _continue_one_phase(a, x, k: int, BL: int, st: SwrState, phase: int):
    """(y float64, new state data float64) of a chunk whose sequences all continue at ``phase``."""
    L = x.shape[-1]
    w, g = _scan_tiles(a, x, st.w, st.g, phase, 0, BL)  # [B, H, DH, nt, BL]
    nt = w.shape[-2]
    # Carriers oldest first: the state's k-1 (reversed) then this chunk's tiles; ext index of tile m is m+k-1.
    v_ext = torch.cat([st.carry_v.flip(-1).to(torch.float64), w[..., -1]], dim=-1)
    p_ext = torch.cat([st.carry_p.flip(-1).to(torch.float64), g[..., -1]], dim=-1)
    C = torch.zeros_like(w[..., 0])
    for p in range(k - 1, 0, -1):  # Horner, oldest carrier first: C_m = v_{m-p} + P_{m-p} * C
        C = v_ext[..., k - 1 - p : k - 1 - p + nt] + p_ext[..., k - 1 - p : k - 1 - p + nt] * C
    y = w + g * C.unsqueeze(-1)
    y = y.reshape(*y.shape[:-2], nt * BL)[..., phase : phase + L]
    return y, _final_one_phase(w, g, v_ext, p_ext, k, BL, phase, L, st)


def _final_one_phase(w, g, v_ext, p_ext, k: int, BL: int, phase: int, L: int, st: SwrState) -> torch.Tensor:
    """New state data (float64) from the chunk's tile scans ``w, g`` and the oldest-first carriers."""
    nfull, new_phase = divmod(phase + L, BL)
    if new_phase:
        new_w, new_g = w[..., nfull, new_phase - 1], g[..., nfull, new_phase - 1]
    else:
        new_w = torch.zeros_like(st.w, dtype=torch.float64)
        new_g = torch.ones_like(st.g, dtype=torch.float64)
    # Newest complete tile nfull-1 sits at ext index nfull-1+k-1; the k-1 newest complete ones, newest first.
    idx = [nfull - 1 + k - 1 - j for j in range(k - 1)]
    vs = [v_ext[..., i] for i in idx]
    ps = [p_ext[..., i].expand_as(new_w) for i in idx]
    parts = [new_w.expand_as(st.w).unsqueeze(-1), new_g.expand_as(st.g).unsqueeze(-1)]
    parts += [torch.stack(vs, dim=-1), torch.stack(ps, dim=-1)] if vs else []
    return torch.cat(parts, dim=-1)


def _initial(state: SwrState | None, x: torch.Tensor, window_blocks: int, block_len: int) -> SwrState:
    if state is not None:
        return state
    B, H, DH = x.shape[:3]
    return SwrState.zeros(B, H, DH, int(window_blocks), x.device, block_len=int(block_len))


def _per_phase(a, x, k: int, BL: int, st: SwrState, fn):
    """Apply ``fn(a_g, x_g, st_g, phase) -> (outputs...)`` per phase group and reassemble along dim 0."""
    groups = _groups_by_phase(st)
    if len(groups) == 1:
        return fn(a, x, st, groups[0][0])
    parts = [fn(a.index_select(0, idx), x.index_select(0, idx), st.select(idx), ph) for ph, idx in groups]
    order = torch.cat([idx for _, idx in groups]).argsort()
    return tuple(torch.cat([p[i] for p in parts], dim=0).index_select(0, order) for i in range(len(parts[0])))


# ---------------------------------------------------------------- public API


def swr_with_state(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int,
                   state: SwrState | None = None) -> tuple[torch.Tensor, SwrState]:  # fmt: skip
    """The SWR of a chunk that continues every sequence after its ``state.pos`` tokens (from the start when
    ``state`` is None).

    a: ``[B, H, L]`` (per head) or ``[B, H, DH, L]`` (per channel); x: ``[B, H, DH, L]``. Returns
    ``(y, new_state)``: y float64 ``[B, H, DH, L]`` equal to positions ``pos .. pos+L-1`` of the one-shot SWR
    of each sequence, and the state after them (dtype of ``state``, float32 when None). Computed from the
    carrier math (local tile scans continued from ``(w, g)``, Horner carry over the carriers) in float64;
    differentiable in ``a``, ``x`` and ``state.data``.
    """
    check_swr_args(a, x, window_blocks, block_len)
    _check_state(state, x, window_blocks, block_len)
    k, BL = int(window_blocks), int(block_len)
    st = _initial(state, x, k, BL)
    y, data = _per_phase(a, x, k, BL, st, lambda a_, x_, s_, ph: _continue_one_phase(a_, x_, k, BL, s_, ph))
    return y, _advanced(st, data, x.shape[-1])


def _advanced(st: SwrState, data: torch.Tensor, length: int) -> SwrState:
    host = None if st.host_pos is None else tuple(p + length for p in st.host_pos)
    return SwrState(data.to(st.dtype), st.pos + length, st.block_len, host)


def final_state(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int,
                state: SwrState | None = None) -> SwrState:  # fmt: skip
    """The state after consuming the chunk ``(a, x)`` from ``state`` (from the start when None).

    Reads only the chunk's last ``k-1`` complete tiles and its trailing partial tile (plus the old state
    when the chunk is shorter than that): O(k*BL) per row. Same dtype as ``state`` (float32 when None);
    computed in float64; differentiable.
    """
    check_swr_args(a, x, window_blocks, block_len)
    _check_state(state, x, window_blocks, block_len)
    k, BL = int(window_blocks), int(block_len)
    st = _initial(state, x, k, BL)
    L = x.shape[-1]

    def one(a_, x_, s_, phase):
        nfull = (phase + L) // BL
        lo = max(0, nfull - (k - 1))  # first tile the new state reads
        w, g = _scan_tiles(a_, x_, s_.w, s_.g, phase, lo, BL)
        # Oldest-first carriers with the state's k-1 before tile 0: tile m (m >= lo) at ext index m + k - 1.
        v_old = s_.carry_v.flip(-1).to(torch.float64)
        p_old = s_.carry_p.flip(-1).to(torch.float64)
        pad = lo  # tiles [0, lo) are never read: fill their carrier slots with zeros
        zeros = torch.zeros((*w.shape[:-2], pad), dtype=torch.float64, device=w.device)
        v_ext = torch.cat([v_old, zeros, w[..., -1]], dim=-1)
        p_ext = torch.cat([p_old, zeros, g[..., -1]], dim=-1)
        w_full = torch.cat([torch.zeros((*w.shape[:-2], lo, BL), dtype=torch.float64, device=w.device), w], dim=-2)
        g_full = torch.cat([torch.ones((*g.shape[:-2], lo, BL), dtype=torch.float64, device=g.device), g], dim=-2)
        return (_final_one_phase(w_full, g_full, v_ext, p_ext, k, BL, phase, L, s_),)

    (data,) = _per_phase(a, x, k, BL, st, one)
    return _advanced(st, data, L)


def decode_step(a_t: torch.Tensor, x_t: torch.Tensor, state: SwrState, window_blocks: int,
                block_len: int) -> tuple[torch.Tensor, SwrState]:  # fmt: skip
    """One token for every sequence: ``a_t`` ``[B, H]`` (per head) or ``[B, H, DH]``, ``x_t`` ``[B, H, DH]``.

    Returns ``(y_t, new_state)``: y_t ``[B, H, DH]`` in the state's dtype, and the state after the token (a
    sequence whose token completes a tile pushes that tile's carrier). Each sequence has its own position;
    the push is a ``torch.where`` on the device, so there is no host synchronisation and one captured CUDA
    graph serves every position.
    """
    if not isinstance(state, SwrState):
        raise TypeError(f"decode_step needs a SwrState (SwrState.zeros(...) to start); got {type(state).__name__}")
    if x_t.dim() != 3:
        raise ValueError(f"x_t must be [B, H, DH]; got shape {list(x_t.shape)}")
    B, H, DH = x_t.shape
    if tuple(a_t.shape) not in ((B, H), (B, H, DH)):
        raise ValueError(f"a_t must be [B, H] = {[B, H]} (per-head gates) or [B, H, DH] = {[B, H, DH]} "
                         f"(per channel); got {list(a_t.shape)}")  # fmt: skip
    if not (x_t.is_floating_point() and a_t.is_floating_point()):
        raise TypeError(f"a_t and x_t must be floating point; got {a_t.dtype}, {x_t.dtype}")
    k = _positive_int("window_blocks", window_blocks)
    BL = _positive_int("block_len", block_len)
    state.check(B, H, DH, k, BL)
    dt = state.dtype
    a = a_t.to(dt)
    if a.dim() == 2:
        a = a.unsqueeze(-1)
    C = _horner(state.carry_v, state.carry_p)
    fresh = (state.pos % BL == 0).view(B, 1, 1)  # a tile starts: the scan starts at this token (w = u, g = a)
    w = torch.where(fresh, x_t.to(dt), a * state.w + x_t.to(dt))
    g = torch.where(fresh, a.expand_as(state.g), a * state.g)
    y = w + g * C
    pos = state.pos + 1
    done = (pos % BL == 0).view(B, 1, 1)  # this token completes its tile
    parts = [torch.where(done, 0.0, w).unsqueeze(-1), torch.where(done, 1.0, g).unsqueeze(-1)]
    if k > 1:
        pushed_v = torch.cat([w.unsqueeze(-1), state.carry_v[..., : k - 2]], dim=-1)
        pushed_p = torch.cat([g.unsqueeze(-1), state.carry_p[..., : k - 2]], dim=-1)
        parts += [torch.where(done.unsqueeze(-1), pushed_v, state.carry_v),
                  torch.where(done.unsqueeze(-1), pushed_p, state.carry_p)]  # fmt: skip
    host = None if state.host_pos is None else tuple(p + 1 for p in state.host_pos)
    return y, SwrState(torch.cat(parts, dim=-1), pos, BL, host)
