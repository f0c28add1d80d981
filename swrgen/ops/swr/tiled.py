"""Torch mirror of the GPU kernels' tile algorithm: forward and closed-form backward, in float64.

Used to check the kernels' math on the CPU against :func:`swrgen.ops.swr.reference.swr_reference`.
Semantics (docs/semantics.md), ``k = window_blocks``, ``BL = block_len``, ``i = t // BL``::

    y_t = sum_{s = max(0, (i-k+1)*BL) .. t} ( prod_{q=s+1..t} a_q ) * u_s

Tiles are processed in independent chunks of ``tiles_per_chunk`` tiles (all tiles in one chunk when
None), like CTAs/warps of a kernel. A chunk sees only its own tiles plus a halo of ``k-1`` tiles before it
(to rebuild the forward carriers) and, in the backward, a lookahead of ``k-1`` tiles after it (to rebuild
the reverse carriers); nothing else crosses a chunk edge, so a result that depended on the chunking would
be a bug in the carrier logic. Inside a chunk the per-tile local scans are vectorised over tiles and the
carrier recursions are vectorised tile shifts.

Padding: L is padded to a multiple of BL with x = 0, dy = 0 and gates 1; the "next gate" after the last
tile (read by the backward's suffix products) is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swrgen.ops.swr.reference import check_swr_args, gates_as_4d

__all__ = ["swr_tiled_backward", "swr_tiled_forward"]


def _to_tiles(t: torch.Tensor, block_len: int, nt: int, pad_value: float) -> torch.Tensor:
    """[..., L] -> float64 [..., nt, BL], padding the partial last tile with ``pad_value``."""
    t = t.to(torch.float64)
    t = F.pad(t, (0, nt * block_len - t.shape[-1]), value=pad_value)
    return t.reshape(*t.shape[:-1], nt, block_len)


def _chunks(nt: int, tiles_per_chunk: int | None) -> list[tuple[int, int]]:
    if tiles_per_chunk is None:
        return [(0, nt)]
    if int(tiles_per_chunk) < 1:
        raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
    tpc = int(tiles_per_chunk)
    return [(c0, min(c0 + tpc, nt)) for c0 in range(0, nt, tpc)]


def _shift_tiles(t: torch.Tensor, p: int) -> torch.Tensor:
    """Along the last (tile) dim of a per-tile tensor [..., nt]: out[i] = t[i - p], zero-filled.

    p > 0 looks back (tile i-p), p < 0 looks ahead (tile i+|p|); tiles outside the slice read as 0, which
    is exactly the rule "tiles before the sequence / past its end have carrier 0".
    """
    dim = t.dim() - 1
    n = t.shape[dim]
    if abs(p) >= n:
        return torch.zeros_like(t)
    if p > 0:
        return torch.cat([torch.zeros_like(t.narrow(dim, 0, p)), t.narrow(dim, 0, n - p)], dim=dim)
    if p < 0:
        q = -p
        return torch.cat([t.narrow(dim, q, n - q), torch.zeros_like(t.narrow(dim, 0, q))], dim=dim)
    return t


def _local_forward(a_t: torch.Tensor, u_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-initialised scan inside every tile: w_t = a_t w_{t-1} + u_t, and g_t = prod_{tile start..t} a.

    a_t: [..., G, nt, BL] with G = 1 (per head) or DH; u_t: [..., DH, nt, BL]. Returns (w, g).
    """
    BL = u_t.shape[-1]
    w_cols = [u_t[..., 0]]
    g_cols = [a_t[..., 0]]
    for r in range(1, BL):
        w_cols.append(a_t[..., r] * w_cols[-1] + u_t[..., r])
        g_cols.append(a_t[..., r] * g_cols[-1])
    return torch.stack(w_cols, dim=-1), torch.stack(g_cols, dim=-1)


def _carry_in(v: torch.Tensor, P: torch.Tensor, k: int) -> torch.Tensor:
    """Horner carry into every tile of the slice: C_i = v_{i-1} + P_{i-1}(v_{i-2} + ... + v_{i-k+1}).

    v: [..., DH, nt]; P: [..., G, nt]. Innermost term first, as the kernel's rolling carrier window does.
    """
    C = torch.zeros_like(v)
    for p in range(k - 1, 0, -1):
        C = _shift_tiles(v, p) + _shift_tiles(P, p) * C
    return C


def swr_tiled_forward(
    a: torch.Tensor,
    x: torch.Tensor,
    window_blocks: int,
    block_len: int,
    tiles_per_chunk: int | None = None,
) -> torch.Tensor:
    """Forward by local tile scans + Horner carry: ``y_t = w_t + g_t * C_i``. Returns float64 [B,H,DH,L].

    Each chunk of tiles [c0, c1) recomputes the carriers of its k-1 halo tiles [c0-k+1, c0) itself.
    """
    check_swr_args(a, x, window_blocks, block_len)
    BL = int(block_len)
    L = x.shape[-1]
    nt = -(-L // BL)
    k = min(int(window_blocks), nt)  # a window longer than the sequence sees all of it
    a_t = _to_tiles(gates_as_4d(a), BL, nt, 1.0)
    u_t = _to_tiles(x, BL, nt, 0.0)
    ys = []
    for c0, c1 in _chunks(nt, tiles_per_chunk):
        lo = max(0, c0 - (k - 1))  # halo start: all this chunk may read
        w, g = _local_forward(a_t[..., lo:c1, :], u_t[..., lo:c1, :])
        C = _carry_in(w[..., -1], g[..., -1], k)  # carriers v_i = w[tile end], P_i = g[tile end]
        y = w + g * C.unsqueeze(-1)
        ys.append(y[..., c0 - lo :, :])
    y = torch.cat(ys, dim=-2)
    return y.reshape(*y.shape[:-2], nt * BL)[..., :L]


def swr_tiled_backward(
    a: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    window_blocks: int,
    block_len: int,
    tiles_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`swr_tiled_forward`: returns float64 ``(dx, da)`` shaped like x, a.

    For token q in tile j (all per tile, vectorised over the chunk's tiles):

    * reverse local scan ``r_s = dy_s + a_{s+1} r_{s+1}`` (0 past the tile end) and suffix product
      ``G'_s = prod_{q=s+1..(j+1)BL} a_q`` (includes the next tile's first gate; 0 after the last tile);
      reverse carriers ``rho_j = r[tile start]``, ``Q_j = G'[tile start]``;
    * ``D^(m)_j = rho_{j+1} + Q_{j+1} D^(m-1)_{j+1}`` (``D^(0) = 0``), ``R^(m) = r + G' D^(m)``;
    * ``dx = R^(k-1)``;
    * ``da_q = sum_channels[ w_{q-1} R^(k-1)_q + gx_q sum_{p=1}^{k-1} c_p R^(k-1-p)_q ]`` with
      ``w_{q-1}`` the tile-local forward state before q (0 at tile start), ``gx_q = prod_{jBL..q-1} a``
      and the forward constants ``c_p = (prod_{m=1}^{p-1} P_{j-m}) v_{j-p}``.

    The sum over channels applies to per-head gates only. Each chunk [c0, c1) reads the halo
    [c0-k+1, c0) (for c_p, i.e. the forward carriers) and the lookahead [c1, c1+k-1) (for D).
    """
    check_swr_args(a, x, window_blocks, block_len)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    BL = int(block_len)
    L = x.shape[-1]
    nt = -(-L // BL)
    k = min(int(window_blocks), nt)  # a window longer than the sequence sees all of it
    per_head = a.dim() == 3
    a_t = _to_tiles(gates_as_4d(a), BL, nt, 1.0)
    u_t = _to_tiles(x, BL, nt, 0.0)
    dy_t = _to_tiles(dy, BL, nt, 0.0)
    # First gate of the next tile, one per tile; the tile after the last one has gate 0.
    a_next = _shift_tiles(a_t[..., 0], -1)  # [..., G, nt]

    dxs, das = [], []
    for c0, c1 in _chunks(nt, tiles_per_chunk):
        lo, hi = max(0, c0 - (k - 1)), min(nt, c1 + (k - 1))  # halo before, lookahead after
        a_s, u_s, dy_s = a_t[..., lo:hi, :], u_t[..., lo:hi, :], dy_t[..., lo:hi, :]

        # Forward recompute: tile-local states and inclusive prefix products.
        w, g = _local_forward(a_s, u_s)
        v, P = w[..., -1], g[..., -1]
        wx = F.pad(w[..., :-1], (1, 0), value=0.0)  # w_{q-1}, 0 at tile start
        gx = F.pad(g[..., :-1], (1, 0), value=1.0)  # prod_{jBL..q-1} a, 1 at tile start

        # Reverse local scan with shifted gates b_s = a_{s+1}; suffix products G' include a_next.
        r_cols = [dy_s[..., BL - 1]]
        G_cols = [a_next[..., lo:hi]]
        for s in range(BL - 2, -1, -1):
            b = a_s[..., s + 1]
            r_cols.append(dy_s[..., s] + b * r_cols[-1])
            G_cols.append(b * G_cols[-1])
        r = torch.stack(r_cols[::-1], dim=-1)
        Gp = torch.stack(G_cols[::-1], dim=-1)
        rho, Q = r[..., 0], Gp[..., 0]

        # R^(m) for m = 0..k-1 (reverse carries from the next m tiles).
        R = [r]
        D = torch.zeros_like(rho)
        for _m in range(1, k):
            D = _shift_tiles(rho, -1) + _shift_tiles(Q, -1) * _shift_tiles(D, -1)
            R.append(r + Gp * D.unsqueeze(-1))
        dx = R[k - 1]

        # da: in-tile part plus c_p, p = 1..k-1 (c_1 = v_{j-1}, c_p(j) = P_{j-1} c_{p-1}(j-1)).
        da = wx * R[k - 1]
        c = torch.zeros_like(v)
        carry_part = torch.zeros_like(dx)
        for p in range(1, k):
            c = _shift_tiles(v, 1) if p == 1 else _shift_tiles(P, 1) * _shift_tiles(c, 1)
            carry_part = carry_part + c.unsqueeze(-1) * R[k - 1 - p]
        da = da + gx * carry_part
        if per_head:
            da = da.sum(dim=2, keepdim=True)
        dxs.append(dx[..., c0 - lo : c1 - lo, :])
        das.append(da[..., c0 - lo : c1 - lo, :])

    dx = torch.cat(dxs, dim=-2)
    da = torch.cat(das, dim=-2)
    dx = dx.reshape(*dx.shape[:-2], nt * BL)[..., :L]
    da = da.reshape(*da.shape[:-2], nt * BL)[..., :L]
    return dx, (da.squeeze(2) if per_head else da)


# ---------------------------------------------------------------- with a streaming state
#
# The kernels continue a sequence from a state (docs/algorithms.md, "State in and out"): in virtual
# coordinates the chunk's tokens sit at positions [ph, ph + L) of its tiles (ph = pos % BL), the state's
# partial tile enters as virtual tokens (g0 the tile's first gate, w0 the input at ph - 1; the other
# positions before ph u = 0, a = 1), and its carriers are those of the k-1 tiles before tile 0. The backward
# takes the gradient of the new state as *injections* into the tiles it was read from, and returns the
# gradient of the old one: the virtual token's dx, da, and the carriers' gradients by the reverse carriers
# of tiles -1 .. -(k-1). These functions mirror that math per sequence, in float64, so the CPU tests check
# it against autograd of the reference.


def _virtual_tiles(t: torch.Tensor, ph: int, nt: int, BL: int, fill: float) -> torch.Tensor:
    """[..., L] -> float64 [..., nt, BL] with the tokens at virtual positions [ph, ph + L), ``fill`` elsewhere."""
    t = t.to(torch.float64)
    t = F.pad(t, (ph, nt * BL - ph - t.shape[-1]), value=fill)
    return t.reshape(*t.shape[:-1], nt, BL)


def _state_parts(data: torch.Tensor, k: int):
    """(w0, g0, v [.., k-1], P [.., k-1]) newest first, float64."""
    d = data.to(torch.float64)
    return d[..., 0], d[..., 1], d[..., 2 : 2 + k - 1], d[..., 2 + k - 1 :]


def _extended(a: torch.Tensor, x: torch.Tensor, ph: int, k: int, BL: int, data: torch.Tensor | None):
    """Virtual-coordinate tiles of one sequence: (a_v [H, DH, nt, BL], u_v, hi, nt), the state's virtual token in."""
    L = x.shape[-1]
    hi = ph + L
    nt = -(-hi // BL)
    a4 = (a.unsqueeze(-2) if a.dim() == 2 else a).expand(*x.shape[:-1], L)  # per-head gates over the channels
    a_v = _virtual_tiles(a4, ph, nt, BL, 1.0)
    u_v = _virtual_tiles(x, ph, nt, BL, 0.0)
    if data is not None and ph > 0:  # the partial tile's (w0, g0): g0 as its first gate, w0 the input at ph - 1
        w0, g0, _, _ = _state_parts(data, k)
        u_v = u_v.clone()
        a_v = a_v.clone()
        u_v[..., 0, ph - 1] = w0
        a_v[..., 0, 0] = g0
    return a_v, u_v, hi, nt


def _carriers_with_state(v: torch.Tensor, P: torch.Tensor, k: int, data: torch.Tensor | None):
    """Oldest-first carriers of tiles -(k-1) .. nt-1 (tile m at index m + k - 1)."""
    if data is None:
        zv = torch.zeros((*v.shape[:-1], k - 1), dtype=torch.float64)
        return torch.cat([zv, v], dim=-1), torch.cat([zv, P], dim=-1)
    _, _, sv, sp = _state_parts(data, k)
    return torch.cat([sv.flip(-1), v], dim=-1), torch.cat([sp.flip(-1), P], dim=-1)


def _carry(v_ext: torch.Tensor, p_ext: torch.Tensor, k: int, nt: int) -> torch.Tensor:
    """C_j for j = 0..nt-1 by Horner over the k-1 carriers before each tile."""
    C = torch.zeros((*v_ext.shape[:-1], nt), dtype=torch.float64)
    for p in range(k - 1, 0, -1):
        C = v_ext[..., k - 1 - p : k - 1 - p + nt] + p_ext[..., k - 1 - p : k - 1 - p + nt] * C
    return C


def swr_tiled_forward_state(a: torch.Tensor, x: torch.Tensor, window_blocks: int, block_len: int,
                            data: torch.Tensor | None,
                            pos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward of a chunk continuing each batch entry b from ``data[b]`` after ``pos[b]`` tokens.

    Returns float64 (y [B, H, DH, L], new state data [B, H, DH, 2 + 2(k-1)]).
    """
    k, BL = int(window_blocks), int(block_len)
    ys, outs = [], []
    for b in range(x.shape[0]):
        ph = pos[b] % BL
        d = None if data is None else data[b]
        a_v, u_v, hi, nt = _extended(a[b], x[b], ph, k, BL, d)
        w, g = _local_forward(a_v, u_v)
        v_ext, p_ext = _carriers_with_state(w[..., -1], g[..., -1], k, d)
        y = w + g * _carry(v_ext, p_ext, k, nt).unsqueeze(-1)
        ys.append(y.reshape(*y.shape[:-2], nt * BL)[..., ph:hi])
        n_full, ph_out = divmod(hi, BL)
        # The partial tile's pushed carrier is (w, g) at hi - 1: the padding past hi has u = 0, a = 1.
        w_o = w[..., n_full, BL - 1] if ph_out else torch.zeros(w.shape[:-2], dtype=torch.float64)
        g_o = g[..., n_full, BL - 1] if ph_out else torch.ones(w.shape[:-2], dtype=torch.float64)
        idx = [n_full - i + k - 1 for i in range(1, k)]  # tiles n_full-1 .. n_full-k+1, newest first
        parts = [w_o.unsqueeze(-1), g_o.unsqueeze(-1)] + [v_ext[..., i : i + 1] for i in idx]
        parts += [p_ext[..., i : i + 1] for i in idx]
        outs.append(torch.cat(parts, dim=-1))
    return torch.stack(ys), torch.stack(outs)


def swr_tiled_backward_state(a: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, window_blocks: int,
                             block_len: int, data: torch.Tensor | None, pos: list[int], d_out: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Closed-form gradients of :func:`swr_tiled_forward_state` as the kernels compute them.

    ``d_out``: gradient of the new state's data (None: zero). Returns float64 (dx, da shaped like x, a, and
    the gradient of ``data`` [B, H, DH, 2 + 2(k-1)]; zero where ``data`` is None).
    """
    k, BL = int(window_blocks), int(block_len)
    per_head = a.dim() == 3
    dxs, das, dds = [], [], []
    for b in range(x.shape[0]):
        ph = pos[b] % BL
        d = None if data is None else data[b]
        a_v, u_v, hi, nt = _extended(a[b], x[b], ph, k, BL, d)
        pos_v = torch.arange(nt * BL).reshape(nt, BL)
        dy_v = _virtual_tiles(dy[b], ph, nt, BL, 0.0)
        ga = torch.where(pos_v < hi, a_v, 0.0)  # nothing flows back from past the end
        w, g = _local_forward(a_v, u_v)
        v_ext, p_ext = _carriers_with_state(w[..., -1], g[..., -1], k, d)
        wx = F.pad(w[..., :-1], (1, 0), value=0.0)
        gx = F.pad(g[..., :-1], (1, 0), value=1.0)
        a_next = torch.cat([ga[..., 1:, 0], torch.zeros_like(ga[..., :1, 0])], dim=-1)  # [.., nt]
        # Reverse local scans (gates 0 past hi) and the injection suffix products gsx (gates 1 past hi).
        r_cols, G_cols, X_cols = [dy_v[..., BL - 1]], [a_next], [torch.ones_like(a_next)]
        for s in range(BL - 2, -1, -1):
            r_cols.append(dy_v[..., s] + ga[..., s + 1] * r_cols[-1])
            G_cols.append(ga[..., s + 1] * G_cols[-1])
            X_cols.append(a_v[..., s + 1] * X_cols[-1])
        r = torch.stack(r_cols[::-1], dim=-1)
        Gp = torch.stack(G_cols[::-1], dim=-1)
        gsx = torch.stack(X_cols[::-1], dim=-1)
        rho, Q = r[..., 0], Gp[..., 0]  # [.., nt]
        R = [r]
        D = torch.zeros_like(rho)
        for _m in range(1, k):
            D = _shift_tiles(rho, -1) + _shift_tiles(Q, -1) * _shift_tiles(D, -1)
            R.append(r + Gp * D.unsqueeze(-1))
        # Injections of the new state's gradient into the tiles it was read from.
        inj_v = torch.zeros_like(rho)
        inj_p = torch.zeros_like(rho)
        n_full, ph_out = divmod(hi, BL)
        d_in = torch.zeros((*x.shape[1:3], 2 + 2 * (k - 1)), dtype=torch.float64)
        if d_out is not None:
            do = d_out[b].to(torch.float64)
            if ph_out:
                inj_v[..., nt - 1] += do[..., 0]
                inj_p[..., nt - 1] += do[..., 1]
            for i in range(1, k):
                t = n_full - i
                if t >= 0:
                    inj_v[..., t] += do[..., 1 + i]
                    inj_p[..., t] += do[..., k + i]
                else:  # the old state's carrier -t, passed through
                    d_in[..., 1 - t] += do[..., 1 + i]
                    d_in[..., k - t] += do[..., k + i]
        full = R[k - 1] + gsx * inj_v.unsqueeze(-1)
        acc = torch.zeros_like(full)
        for q in range(1, k):  # c_q(j) = (prod_{m<q} P_{j-m}) v_{j-q}, with the state's carriers before 0
            c = v_ext[..., k - 1 - q : k - 1 - q + nt]  # tile j - q sits at index j - q + k - 1
            for m in range(1, q):
                c = c * p_ext[..., k - 1 - m : k - 1 - m + nt]
            acc = acc + c.unsqueeze(-1) * R[k - 1 - q]
        dav = wx * full + gx * (acc + gsx * inj_p.unsqueeze(-1))
        if d is not None:
            if ph > 0:  # the virtual tokens: w0 at ph - 1, g0 the tile's first gate
                d_in[..., 0] += full[..., 0, ph - 1]
                d_in[..., 1] += dav[..., 0, 0]
            a0 = ga[..., 0, 0] if nt else torch.zeros(x.shape[1:3], dtype=torch.float64)  # empty: nothing after
            d_in += _virtual_tile_grads(d, k, rho, Q, a0)
        dx = full.reshape(*full.shape[:-2], nt * BL)[..., ph:hi]
        da = dav.reshape(*dav.shape[:-2], nt * BL)[..., ph:hi]
        dxs.append(dx)
        das.append(da.sum(dim=1) if per_head else da)
        dds.append(d_in)
    return torch.stack(dxs), torch.stack(das), torch.stack(dds)


def _virtual_tile_grads(data: torch.Tensor, k: int, rho: torch.Tensor, Q: torch.Tensor,
                        a0: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Gradient of the old state's carriers: tiles -1 .. -(k-1) as virtual tiles whose last token is (v, P).

    rho, Q: the chunk's reverse carriers [.., nt]; a0: the gate at virtual position 0 of tile 0 (the first
    gate after tile -1; 0 when the chunk is empty). A virtual tile has dy = 0 (rho = 0), Q = P * a_next.
    """
    _, _, sv, sp = _state_parts(data, k)
    out = torch.zeros((*data.shape[:-1], 2 + 2 * (k - 1)), dtype=torch.float64)
    nt = rho.shape[-1]

    def tile(t: int):  # (rho_t, Q_t) for t >= -(k-1)
        if t >= 0:
            z = torch.zeros_like(a0)
            return (rho[..., t], Q[..., t]) if t < nt else (z, z)
        an = a0 if t == -1 else torch.ones_like(a0)
        return torch.zeros_like(a0), sp[..., -t - 1] * an

    def carrier(t: int):  # (v_t, P_t) of a tile before the chunk; 0 before tile -(k-1)
        if t < -(k - 1):
            z = torch.zeros_like(a0)
            return z, z
        return sv[..., -t - 1], sp[..., -t - 1]

    for p in range(1, k):
        t = -p
        an = a0 if p == 1 else torch.ones_like(a0)
        Dm = [torch.zeros_like(a0)]
        prod = torch.ones_like(a0)
        for i in range(1, k):
            r_i, q_i = tile(t + i)
            Dm.append(Dm[-1] + prod * r_i)
            prod = prod * q_i
        out[..., 1 + p] += an * Dm[k - 1]
        fprod = torch.ones_like(a0)
        dP = torch.zeros_like(a0)
        for q in range(1, k):
            vq, pq = carrier(t - q)
            dP = dP + fprod * vq * an * Dm[k - 1 - q]
            fprod = fprod * pq
        out[..., k + p] += dP
    return out
