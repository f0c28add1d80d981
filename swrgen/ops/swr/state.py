"""Streaming state of the SWR: prefill a chunk, continue with another, decode one token at a time.

Semantics (docs/semantics.md), ``k = window_blocks``, ``BL = block_len``, tile ``i = t // BL``::

    y_t = sum_{s = max(0, (i-k+1)*BL) .. t} ( prod_{q=s+1..t} a_q ) * u_s

Tiles are aligned to the sequence's position 0. With the tile-local (zero-initialised) scan
``w_t = a_t w_{t-1} + u_t`` and inclusive gate product ``g_t`` of tile ``i``, and the carriers
``v_j`` / ``P_j`` (``w`` / ``g`` at the last token of complete tile ``j``), the output is
``y_t = w_t + g_t * C_i`` with the Horner carry ``C_i = v_{i-1} + P_{i-1} (v_{i-2} + ... + P_{i-k+2} v_{i-k+1})``
(``C_i = 0`` for ``k = 1``; carriers of tiles before the sequence start are 0).

So everything a continuation needs after ``pos`` tokens is (:class:`SwrState`):

* ``w``, ``g`` ``[B, H, DH]``: the local state and inclusive gate product of the current, partial tile
  ``n = pos // BL`` after its first ``pos % BL`` tokens (``w = 0``, ``g = 1`` at a tile boundary);
* ``carry_v``, ``carry_p`` ``[B, H, DH, k-1]``: ``v_{n-1}, ..., v_{n-k+1}`` and ``P_{n-1}, ..., P_{n-k+1}``,
  newest first (``P`` is stored per channel even for per-head gates; ``P_{n-k+1}`` is never read by the
  carry into tile ``n`` but is kept so the layout is fixed).

``packed()`` gives the ``[B, H, DH, 2 + 2(k-1)]`` float32 buffer ``[w, g, v_1..v_{k-1}, p_1..p_{k-1}]``
that the GPU kernels read and write.

Functions: :func:`swr_with_state` (float64 reference of a continued chunk, differentiable),
:func:`final_state` (the state after a chunk: O(k*BL) per row, never a pass over the whole chunk),
:func:`decode_step` (one token for a batch: O(k*DH) elementwise ops, no host sync, CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swrgen.ops.swr.reference import check_swr_args

__all__ = ["SwrState", "decode_step", "final_state", "swr_with_state"]


@dataclass
class SwrState:
    """SWR state after ``pos`` tokens (the same ``pos`` for every sequence of the batch).

    ``carry_v``/``carry_p``: ``[B, H, DH, k-1]``, newest complete tile first; ``w``/``g``: ``[B, H, DH]``.
    Tensors are float32 (what the GPU kernels use); float64 states are accepted on any device and keep
    the reference exact. ``block_len`` is the tile length the state was built with (checked on use).
    """

    pos: int
    carry_v: torch.Tensor
    carry_p: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor
    block_len: int

    def __post_init__(self) -> None:
        if isinstance(self.pos, bool) or not isinstance(self.pos, int) or self.pos < 0:
            raise ValueError(f"SwrState.pos must be an int >= 0 (tokens consumed); got {self.pos!r}")
        if isinstance(self.block_len, bool) or not isinstance(self.block_len, int) or self.block_len < 1:
            raise ValueError(f"SwrState.block_len must be an int >= 1; got {self.block_len!r}")
        for name in ("carry_v", "carry_p", "w", "g"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"SwrState.{name} must be a floating-point tensor; got {type(t).__name__}")
        if self.w.dim() != 3:
            raise ValueError(f"SwrState.w must be [B, H, DH]; got shape {tuple(self.w.shape)}")
        if self.g.shape != self.w.shape:
            raise ValueError(f"SwrState.g must have w's shape {tuple(self.w.shape)}; got {tuple(self.g.shape)}")
        for name in ("carry_v", "carry_p"):
            t = getattr(self, name)
            if t.dim() != 4 or t.shape[:3] != self.w.shape:
                raise ValueError(
                    f"SwrState.{name} must be [B, H, DH, k-1] with [B, H, DH] = {list(self.w.shape)}; "
                    f"got {list(t.shape)}"
                )
        if self.carry_p.shape != self.carry_v.shape:
            raise ValueError(
                f"SwrState.carry_p must have carry_v's shape {list(self.carry_v.shape)}; got {list(self.carry_p.shape)}"
            )

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        head_dim: int,
        window_blocks: int,
        device: torch.device | str | None = None,
        *,
        block_len: int = 16,
        dtype: torch.dtype = torch.float32,
    ) -> SwrState:
        """The state before the first token: ``pos = 0``, zero carriers, ``w = 0``, ``g = 1``."""
        if isinstance(window_blocks, bool) or not isinstance(window_blocks, int) or window_blocks < 1:
            raise ValueError(f"window_blocks must be an int >= 1; got {window_blocks!r}")
        shape = (batch, heads, head_dim)
        carry = torch.zeros(*shape, window_blocks - 1, device=device, dtype=dtype)
        return cls(
            pos=0,
            carry_v=carry,
            carry_p=carry.clone(),
            w=torch.zeros(shape, device=device, dtype=dtype),
            g=torch.ones(shape, device=device, dtype=dtype),
            block_len=block_len,
        )

    @classmethod
    def from_packed(cls, packed: torch.Tensor, pos: int, block_len: int) -> SwrState:
        """Inverse of :meth:`packed`: ``[B, H, DH, 2 + 2(k-1)]`` = ``[w, g, v_1..v_{k-1}, p_1..p_{k-1}]``."""
        if packed.dim() != 4 or packed.shape[-1] < 2 or packed.shape[-1] % 2:
            raise ValueError(f"packed state must be [B, H, DH, 2 + 2(k-1)]; got shape {list(packed.shape)}")
        km1 = (packed.shape[-1] - 2) // 2
        return cls(
            pos=pos,
            carry_v=packed[..., 2 : 2 + km1],
            carry_p=packed[..., 2 + km1 :],
            w=packed[..., 0],
            g=packed[..., 1],
            block_len=block_len,
        )

    @property
    def window_blocks(self) -> int:
        return self.carry_v.shape[-1] + 1

    @property
    def phase(self) -> int:
        """Tokens already in the current tile: ``pos % block_len``."""
        return self.pos % self.block_len

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, H, DH)``."""
        return tuple(self.w.shape)

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    def packed(self) -> torch.Tensor:
        """Contiguous float32 ``[B, H, DH, 2 + 2(k-1)]``: ``[w, g, v_1..v_{k-1}, p_1..p_{k-1}]`` (GPU layout)."""
        parts = [self.w.unsqueeze(-1), self.g.unsqueeze(-1), self.carry_v, self.carry_p]
        return torch.cat([p.to(torch.float32) for p in parts], dim=-1).contiguous()

    def clone(self) -> SwrState:
        return SwrState(self.pos, self.carry_v.clone(), self.carry_p.clone(), self.w.clone(), self.g.clone(),
                        self.block_len)  # fmt: skip

    def detach(self) -> SwrState:
        return SwrState(self.pos, self.carry_v.detach(), self.carry_p.detach(), self.w.detach(), self.g.detach(),
                        self.block_len)  # fmt: skip

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SwrState:
        def cv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return SwrState(self.pos, cv(self.carry_v), cv(self.carry_p), cv(self.w), cv(self.g), self.block_len)

    def check(self, batch: int, heads: int, head_dim: int, window_blocks: int, block_len: int) -> None:
        """Raise ValueError unless this state fits inputs of ``[batch, heads, head_dim]`` and the window."""
        if self.window_blocks != window_blocks:
            raise ValueError(
                f"state was built for window_blocks={self.window_blocks} (carry of {self.window_blocks - 1} tiles) "
                f"but the call has window_blocks={window_blocks}; allowed: a state from the same window"
            )
        if self.block_len != block_len:
            raise ValueError(
                f"state was built for block_len={self.block_len} but the call has block_len={block_len}; "
                f"allowed: a state from the same block_len"
            )
        if tuple(self.w.shape) != (batch, heads, head_dim):
            raise ValueError(
                f"state has [B, H, DH] = {list(self.w.shape)} but the inputs have {[batch, heads, head_dim]}; "
                f"allowed: a state of the same batch, heads and head_dim"
            )


# ---------------------------------------------------------------- helpers


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


def _scan_tiles(
    a: torch.Tensor,
    x: torch.Tensor,
    w0: torch.Tensor,
    g0: torch.Tensor,
    phase: int,
    first_tile: int,
    block_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-local scans of a chunk that starts ``phase`` tokens into a tile, in float64.

    Chunk token ``t`` sits at tile position ``phase + t`` (tile 0 is the partial tile the chunk continues).
    Returns ``(w, g)`` ``[B, H, DH, n, BL]`` for tiles ``first_tile .. ceil((phase+L)/BL)-1``; tile 0 starts
    from ``(w0, g0)`` (its first ``phase`` slots and the slots past the chunk end are padding with a = 1,
    u = 0, so the scan carries (w, g) through them unchanged), every other tile from ``(0, 1)``.
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
    if first_tile == 0:  # the partial tile continues from (w0, g0)
        w = torch.cat([w0.to(torch.float64).unsqueeze(-1), w[..., 1:]], dim=-1)
        g = torch.cat([g0.to(torch.float64).unsqueeze(-1), g[..., 1:]], dim=-1)
    ws, gs = [], []
    for r in range(BL):
        w = a_s[..., r] * w + u_s[..., r]
        g = a_s[..., r] * g
        ws.append(w)
        gs.append(g)
    return torch.stack(ws, dim=-1), torch.stack(gs, dim=-1)


def _initial(state: SwrState | None, x: torch.Tensor, window_blocks: int, block_len: int) -> SwrState:
    if state is not None:
        return state
    B, H, DH = x.shape[:3]
    return SwrState.zeros(B, H, DH, int(window_blocks), x.device, block_len=int(block_len))


# ---------------------------------------------------------------- public API


def swr_with_state(
    a: torch.Tensor,
    x: torch.Tensor,
    window_blocks: int,
    block_len: int,
    state: SwrState | None = None,
) -> tuple[torch.Tensor, SwrState]:
    """The SWR of a chunk that continues after ``state.pos`` tokens (from the start when ``state`` is None).

    a: ``[B, H, L]`` (per head) or ``[B, H, DH, L]`` (per channel); x: ``[B, H, DH, L]``. Returns
    ``(y, new_state)``: y float64 ``[B, H, DH, L]`` equal to positions ``pos .. pos+L-1`` of the one-shot SWR
    over all ``pos + L`` tokens, and the state after them (dtype of ``state``, float32 when None).
    Computed from the carrier math (local tile scans continued from ``(w, g)``, Horner carry over
    ``carry_v``/``carry_p``) in float64; differentiable in ``a``, ``x`` and the state's tensors.
    """
    check_swr_args(a, x, window_blocks, block_len)
    _check_state(state, x, window_blocks, block_len)
    k, BL = int(window_blocks), int(block_len)
    st = _initial(state, x, k, BL)
    phase, L = st.phase, x.shape[-1]
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
    return y, final_state(a, x, k, BL, st)


def final_state(
    a: torch.Tensor,
    x: torch.Tensor,
    window_blocks: int,
    block_len: int,
    state: SwrState | None = None,
) -> SwrState:
    """The state after consuming the chunk ``(a, x)`` from ``state`` (from the start when None).

    Reads only the chunk's last ``k-1`` complete tiles and its trailing partial tile (plus the old state
    when the chunk is shorter than that): O(k*BL) per row, independent of L and of y. Same dtype as
    ``state`` (float32 when None); computed in float64; differentiable.
    """
    check_swr_args(a, x, window_blocks, block_len)
    _check_state(state, x, window_blocks, block_len)
    k, BL = int(window_blocks), int(block_len)
    st = _initial(state, x, k, BL)
    phase, L = st.phase, x.shape[-1]
    end = phase + L  # tile positions consumed in the chunk's tile frame (tile 0 = the continued tile)
    nfull, new_phase = divmod(end, BL)
    lo = max(0, nfull - (k - 1))
    w, g = _scan_tiles(a, x, st.w, st.g, phase, lo, BL)  # tiles lo .. ceil(end/BL)-1
    dt = st.dtype
    if new_phase:
        new_w, new_g = w[..., -1, new_phase - 1], g[..., -1, new_phase - 1]
    else:
        new_w, new_g = torch.zeros_like(st.w, dtype=torch.float64), torch.ones_like(st.g, dtype=torch.float64)
    vs, ps = [], []
    for j in range(1, k):  # newest first: tile nfull - j of the chunk frame
        m = nfull - j
        if m >= lo:
            vs.append(w[..., m - lo, BL - 1])
            ps.append(g[..., m - lo, BL - 1].expand_as(st.w))
        else:  # before the chunk: the old state's carrier (m - lo < 0 only when lo == 0)
            vs.append(st.carry_v[..., j - nfull - 1].to(torch.float64))
            ps.append(st.carry_p[..., j - nfull - 1].to(torch.float64))
    if vs:
        carry_v, carry_p = torch.stack(vs, dim=-1).to(dt), torch.stack(ps, dim=-1).to(dt)
    else:
        carry_v, carry_p = st.carry_v.new_zeros(st.carry_v.shape), st.carry_p.new_zeros(st.carry_p.shape)
    return SwrState(st.pos + L, carry_v, carry_p, new_w.expand_as(st.w).to(dt), new_g.expand_as(st.g).to(dt), BL)


def decode_step(
    a_t: torch.Tensor,
    x_t: torch.Tensor,
    state: SwrState,
    window_blocks: int,
    block_len: int,
) -> tuple[torch.Tensor, SwrState]:
    """One token for a batch: ``a_t`` ``[B, H]`` (per head) or ``[B, H, DH]``, ``x_t`` ``[B, H, DH]``.

    Returns ``(y_t, new_state)``: y_t ``[B, H, DH]`` in the state's dtype (float32), and the state after the
    token (the finished tile's carrier is pushed when the token completes a tile). O(k*DH) elementwise
    torch ops on the state's device; no host synchronisation (``pos`` is a Python int, so the push is a
    Python branch: a captured CUDA graph is valid for the tile phase it was captured at).
    """
    if not isinstance(state, SwrState):
        raise TypeError(f"decode_step needs a SwrState (SwrState.zeros(...) to start); got {type(state).__name__}")
    if x_t.dim() != 3:
        raise ValueError(f"x_t must be [B, H, DH]; got shape {list(x_t.shape)}")
    B, H, DH = x_t.shape
    if tuple(a_t.shape) not in ((B, H), (B, H, DH)):
        raise ValueError(
            f"a_t must be [B, H] = {[B, H]} (per-head gates) or [B, H, DH] = {[B, H, DH]} (per channel); "
            f"got {list(a_t.shape)}"
        )
    if not (x_t.is_floating_point() and a_t.is_floating_point()):
        raise TypeError(f"a_t and x_t must be floating point; got {a_t.dtype}, {x_t.dtype}")
    k, BL = int(window_blocks), int(block_len)
    state.check(B, H, DH, k, BL)
    dt = state.dtype
    a = a_t.to(dt)
    if a.dim() == 2:
        a = a.unsqueeze(-1)
    C = _horner(state.carry_v, state.carry_p)
    w = a * state.w + x_t.to(dt)
    g = a * state.g
    y = w + g * C
    pos = state.pos + 1
    if pos % BL or k == 1:
        if pos % BL == 0:  # k = 1: no carriers; the tile restarts
            w, g = torch.zeros_like(w), torch.ones_like(g)
        return y, SwrState(pos, state.carry_v, state.carry_p, w, g, BL)
    carry_v = torch.cat([w.unsqueeze(-1), state.carry_v[..., : k - 2]], dim=-1)
    carry_p = torch.cat([g.unsqueeze(-1), state.carry_p[..., : k - 2]], dim=-1)
    return y, SwrState(pos, carry_v, carry_p, torch.zeros_like(w), torch.ones_like(g), BL)
