"""The Phalanx layer (docs/semantics.md, "The Phalanx layer"): a gated Sliding Window Recurrence in place of
local attention.

For ``x`` ``[B, L, D]``, one fused input projection gives, per token::

    A = decay_max * sigmoid(W_a x)   [B, L, H]          gates, bounded in [0, decay_max]
    B = sigmoid(W_b x)               [B, L, KVH, DH]    shared by the H / KVH heads of a group (like GQA)
    C = W_c x                        [B, L, KVH, DH]    shared the same way
    V = W_v x                        [B, L, H, DH]
    X = B * V;  Y = SWR(A, X);  Z = Y * C + V;  out = W_o Z

Head ``h`` uses kv-head ``h // (H // KVH)`` (``repeat_interleave`` order).

Two paths give the same result. The fused one (CUDA, head_dim 16, the default there) hands the input
projection ``[B, L, N]`` to ``swrgen.phalanx_gating``: one generated kernel applies the gates, runs the
SWR and writes Z ``[B, L, H*DH]`` (and one the backward), with no transposes or separate gating passes:
plain batches, packed sequences (``cu_seqlens``), a state to continue from and the new state all run
there. The unfused one (CPU by default, head_dim 32/64, ``fused=False``) gates in torch and runs
``swrgen.swr`` on ``[B, H, DH, L]`` / ``[B, H, L]``, in the dtype of the projections' outputs.

Streaming: ``forward(x, state=..., return_state=True)`` continues from / returns a
:class:`~swrgen.ops.swr.state.SwrState` (differentiable: chunked training hands it over), ``step(x_t, state)``
decodes one token, and :meth:`Phalanx.decode_` updates a pool of state slots in place (serving).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from swrgen import constants
from swrgen.ops.phalanx import GatingLayout, phalanx_decode, phalanx_gating
from swrgen.ops.swr.op import swr
from swrgen.ops.swr.state import SwrState, decode_step

__all__ = ["Phalanx"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


class Phalanx(nn.Module):
    """Phalanx mixer: ``[B, L, dim] -> [B, L, dim]``.

    Args:
        dim: model width D.
        heads: SWR heads H (default ``dim // head_dim``; then ``dim`` must be a multiple of ``head_dim``).
        head_dim: channels per head DH (16 in the paper; the CUDA kernels take 16, 32 or 64).
        kv_heads: heads of the shared B and C projections (default ``heads``); must divide ``heads``.
        window_blocks: k, tiles in the jagged window (2 = the paper's default).
        block_len: tile length BL (the kernels take 16, 32 or 64).
        decay_max: gates are ``decay_max * sigmoid(.)``, in ``[0, decay_max]``; ``0 < decay_max <= 1``.
        bias: biases in the input and output projections.
        in_proj_bias: a bias in the input projection (all four column blocks), overriding ``bias`` there;
            None = ``bias`` (:meth:`from_spear` needs one on the input projection and none on the output).
        fused: the fused kernels (``swrgen.phalanx_gating``): None = on CUDA when head_dim is 16 (they need
            it), True = always (CPU runs their reference), False = never.
    """

    def __init__(self, dim: int, heads: int | None = None, head_dim: int = 16, kv_heads: int | None = None,
                 window_blocks: int = 2, block_len: int = 16, decay_max: float = 0.8, bias: bool = False,
                 fused: bool | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, in_proj_bias: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        dim = _positive_int("dim", dim)
        head_dim = _positive_int("head_dim", head_dim)
        if heads is None:
            if dim % head_dim:
                raise ValueError(
                    f"dim={dim} is not divisible by head_dim={head_dim}; allowed: dim a multiple of head_dim "
                    f"(heads = dim // head_dim), or pass heads explicitly (inner width heads * head_dim)"
                )
            heads = dim // head_dim
        heads = _positive_int("heads", heads)
        kv_heads = heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
        self.layout = GatingLayout(heads, kv_heads, head_dim)  # checks that kv_heads divides heads
        self.window_blocks = _positive_int("window_blocks", window_blocks)
        self.block_len = _positive_int("block_len", block_len)
        if not (isinstance(decay_max, (int, float)) and not isinstance(decay_max, bool) and 0 < decay_max <= 1):
            raise ValueError(f"decay_max must be a number in (0, 1] (gates lie in [0, decay_max]); got {decay_max!r}")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be None, True or False; got {fused!r}")
        if fused and head_dim != constants.CHANNELS_PER_WARP:
            raise ValueError(f"fused=True needs head_dim {constants.CHANNELS_PER_WARP} (one warp per head); "
                             f"got head_dim={head_dim}. Use fused=None or False.")  # fmt: skip
        self.fused = fused
        self.dim, self.heads, self.head_dim, self.kv_heads = dim, heads, head_dim, kv_heads
        self.decay_max = float(decay_max)
        self.inner = heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if in_proj_bias is not None and not isinstance(in_proj_bias, bool):
            raise ValueError(f"in_proj_bias must be None, True or False; got {in_proj_bias!r}")
        self.in_proj = nn.Linear(dim, self.layout.width, bias=bias if in_proj_bias is None else in_proj_bias, **kw)
        self.out_proj = nn.Linear(self.inner, dim, bias=bias, **kw)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, kv_heads={self.kv_heads}, "
            f"window_blocks={self.window_blocks}, block_len={self.block_len}, decay_max={self.decay_max}, "
            f"fused={self.fused}"
        )

    @classmethod
    def from_spear(cls, state_dict: Mapping[str, torch.Tensor], **overrides: object) -> Phalanx:
        """A layer that computes what the paper's library (spear, ``spear.nn.phalanx.Phalanx``) computes with
        these weights: ``A = sigmoid(proj_a x)``, ``B = sigmoid(proj_b x)``, ``C = proj_c x``, ``V = proj_v x``,
        ``Z = SWR(A, B * V) * C + V``, ``out = proj_out Z``, with biases on ``proj_a/b/c`` only and a plain sigmoid
        gate (``decay_max = 1.0``).

        ``state_dict``: a spear ``Phalanx``'s ``state_dict()`` (keys ``param.proj_{a,b,c}.{weight,bias}``,
        ``param.proj_v.weight``, ``proj_out.weight``; the ``param.`` prefix may be left out). dim, heads,
        head_dim and kv_heads come from the shapes. ``overrides``: other constructor arguments
        (``window_blocks`` and ``block_len`` default to spear's 2 and 16, ``decay_max`` to 1.0; ``fused``,
        ``device``, ``dtype`` (default: the weights' dtype)). The columns go into one ``in_proj`` (A | B | C | V)
        whose V bias is zero (a ``proj_v.bias`` or ``proj_out.bias``, if present, is used too).
        """
        sd = {(k[len("param.") :] if k.startswith("param.") else k): v for k, v in state_dict.items()}
        required = ("proj_a.weight", "proj_a.bias", "proj_b.weight", "proj_b.bias", "proj_c.weight", "proj_c.bias",
                    "proj_v.weight", "proj_out.weight")  # fmt: skip
        optional = ("proj_v.bias", "proj_out.bias")
        missing = [k for k in required if k not in sd]
        unknown = sorted(k for k in sd if k not in required and k not in optional)
        if missing or unknown:
            raise ValueError(f"not a spear Phalanx state dict: missing {missing}, unexpected {unknown}; allowed keys: "
                             f"{list(required + optional)} (each optionally prefixed 'param.')")  # fmt: skip
        wa, wb, wc, wv, wo = (sd[f"{n}.weight"] for n in ("proj_a", "proj_b", "proj_c", "proj_v", "proj_out"))
        heads, dim = wa.shape
        if heads < 1 or wv.shape[0] % heads:
            raise ValueError(f"proj_v.weight has {wv.shape[0]} rows, not a multiple of heads={heads} (proj_a rows)")
        head_dim = wv.shape[0] // heads
        if wb.shape[0] == 0 or wb.shape[0] % head_dim or heads % (wb.shape[0] // head_dim):
            raise ValueError(f"proj_b.weight has {wb.shape[0]} rows: not kv_heads * head_dim ({head_dim}) with "
                             f"kv_heads dividing heads={heads}")  # fmt: skip
        kv_heads = wb.shape[0] // head_dim
        inner = heads * head_dim
        shapes = {"proj_a.bias": (heads,), "proj_b.bias": (wb.shape[0],), "proj_c.weight": tuple(wb.shape),
                  "proj_c.bias": (wb.shape[0],), "proj_v.weight": (inner, dim), "proj_v.bias": (inner,),
                  "proj_b.weight": (kv_heads * head_dim, dim), "proj_out.weight": (dim, inner),
                  "proj_out.bias": (dim,)}  # fmt: skip
        for k, shape in shapes.items():
            if k in sd and tuple(sd[k].shape) != shape:
                raise ValueError(f"{k} has shape {list(sd[k].shape)}; expected {list(shape)} for dim={dim}, "
                                 f"heads={heads}, head_dim={head_dim}, kv_heads={kv_heads}")  # fmt: skip
        for k, v in (("dim", dim), ("heads", heads), ("head_dim", head_dim), ("kv_heads", kv_heads)):
            if k in overrides and overrides[k] != v:
                raise ValueError(f"{k}={overrides[k]!r} contradicts the state dict's shapes ({k}={v})")
        for k in ("bias", "in_proj_bias"):
            if k in overrides:
                raise ValueError(f"{k} is set by the state dict (biases on proj_a/b/c, none on proj_out unless given)")
        for k in ("dim", "heads", "head_dim", "kv_heads"):
            overrides.pop(k, None)
        kw: dict = {"window_blocks": 2, "block_len": 16, "decay_max": 1.0, "dtype": wa.dtype, **overrides}
        layer = cls(dim, heads=heads, head_dim=head_dim, kv_heads=kv_heads, bias="proj_out.bias" in sd,
                    in_proj_bias=True, **kw)  # fmt: skip
        v_bias = sd.get("proj_v.bias", torch.zeros(inner, dtype=wa.dtype, device=wa.device))
        with torch.no_grad():
            layer.in_proj.weight.copy_(torch.cat([wa, wb, wc, wv], dim=0))
            layer.in_proj.bias.copy_(torch.cat([sd["proj_a.bias"], sd["proj_b.bias"], sd["proj_c.bias"], v_bias]))
            layer.out_proj.weight.copy_(wo)
            if "proj_out.bias" in sd:
                layer.out_proj.bias.copy_(sd["proj_out.bias"])
        return layer

    # ------------------------------------------------------------ projections

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[..., KVH*DH] -> [..., H, DH], head h reading kv-head h // (H // KVH) (a broadcast, no copy)."""
        lead = t.shape[:-1]
        groups = self.heads // self.kv_heads
        t = t.view(*lead, self.kv_heads, 1, self.head_dim).expand(*lead, self.kv_heads, groups, self.head_dim)
        return t.reshape(*lead, self.heads, self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A [..., H], B [..., H, DH], C [..., H, DH], V [..., H, DH])`` for tokens ``x`` ``[..., dim]``."""
        a, b, c, v = torch.split(self.in_proj(x), self.layout.split, dim=-1)
        A = self.decay_max * torch.sigmoid(a)
        B = self._expand_kv(torch.sigmoid(b))
        C = self._expand_kv(c)
        V = v.reshape(*v.shape[:-1], self.heads, self.head_dim)
        return A, B, C, V

    # ------------------------------------------------------------ state

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> SwrState:  # fmt: skip
        """The state before the first token, for ``batch`` sequences."""
        if device is None:
            device = self.in_proj.weight.device
        return SwrState.zeros(batch, self.heads, self.head_dim, self.window_blocks, device,
                              block_len=self.block_len, dtype=dtype)  # fmt: skip

    def _check_state(self, state: object, n: int, device: torch.device) -> SwrState:
        if not isinstance(state, SwrState):
            raise TypeError(f"state must be a SwrState (from Phalanx.init_state or forward(return_state=True)); "
                            f"got {type(state).__name__}")  # fmt: skip
        try:
            state.check(n, self.heads, self.head_dim, self.window_blocks, self.block_len)
        except ValueError as e:
            raise ValueError(
                f"state does not fit this Phalanx (sequences={n}, heads={self.heads}, head_dim={self.head_dim}, "
                f"window_blocks={self.window_blocks}, block_len={self.block_len}): {e}"
            ) from None
        if state.device != device:
            raise ValueError(f"state is on {state.device} but the input is on {device}")
        return state

    @staticmethod
    def _state_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------ forward

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.fused is None:
            return x.is_cuda and self.head_dim == constants.CHANNELS_PER_WARP
        return self.fused

    def forward(self, x: torch.Tensor, state: SwrState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                cp_group=None) -> torch.Tensor | tuple[torch.Tensor, SwrState]:  # fmt: skip
        """``x`` ``[B, L, dim]`` -> ``[B, L, dim]`` (and the state after it when ``return_state``).

        ``state``: continue every sequence after the tokens it has seen (each at its own position).
        ``cu_seqlens``: ``x`` is ``[1, T, dim]`` holding packed sequences ``[cu[i], cu[i+1])``, each run alone;
        with a state, the state has one row per packed sequence (chunked prefill of several prompts).
        ``cp_group``: context parallelism (a ProcessGroup or a ``swrgen.distributed.CPContext``): ``x`` is this
        rank's contiguous slice of the sequences (any length, 0 included; ``cu_seqlens`` in global offsets).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, dim={self.dim}]; got {list(getattr(x, 'shape', []))}")
        batch, length = x.shape[:2]
        if cu_seqlens is None and length < 1 and cp_group is None:  # a context-parallel slice may be empty
            raise ValueError("x must hold at least one token (L >= 1)")
        k, bl = self.window_blocks, self.block_len
        if state is not None:
            self._check_state(state, batch if cu_seqlens is None else len(cu_seqlens) - 1, x.device)
        if self._use_fused(x):
            out = phalanx_gating(self.in_proj(x), heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                                 window_blocks=k, block_len=bl, decay_max=self.decay_max, cu_seqlens=cu_seqlens,
                                 initial_state=state, return_state=return_state, cp_group=cp_group)  # fmt: skip
            Z, new_state = out if return_state else (out, None)
            y = self.out_proj(Z)
            return (y, new_state) if return_state else y
        A, B, C, V = self.project(x)
        X = B * V
        a_t = A.transpose(1, 2).contiguous()  # [B, H, L]
        x_t = X.permute(0, 2, 3, 1).contiguous()  # [B, H, DH, L]
        out = swr(a_t, x_t, window_blocks=k, block_len=bl, cu_seqlens=cu_seqlens, initial_state=state,
                  return_state=return_state, cp_group=cp_group)  # fmt: skip
        y, new_state = out if return_state else (out, None)
        Y = y.permute(0, 3, 1, 2).to(V.dtype)  # [B, L, H, DH]
        Z = Y * C + V
        out = self.out_proj(Z.reshape(batch, length, self.inner))
        return (out, new_state) if return_state else out

    # ------------------------------------------------------------ decoding

    def step(self, x_t: torch.Tensor, state: SwrState | None = None) -> tuple[torch.Tensor, SwrState]:
        """Decode one token per sequence: ``x_t`` ``[B, dim]`` -> ``(out_t [B, dim], new state)``.

        Each sequence at its own position; no host sync. On CUDA with head_dim 16 the generated decode
        kernel does the gating and the state update in one launch (on a copy of the state: ``step`` never
        changes its argument; :meth:`decode_` updates a pool in place). ``state=None`` starts new sequences.
        """
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must be [B, dim={self.dim}] (one token per sequence); got shape {list(x_t.shape)}")
        batch = x_t.shape[0]
        if state is None:
            state = self.init_state(batch, x_t.device, self._state_dtype(x_t))
        else:
            state = self._check_state(state, batch, x_t.device)
        if self._use_fused(x_t) and x_t.is_cuda:
            data = state.packed().clone()
            Z = self.decode_(x_t, data, state.pos)
            host = None if state.host_pos is None else tuple(p + 1 for p in state.host_pos)
            return self.out_proj(Z), SwrState(data, state.pos + 1, self.block_len, host)
        A, B, C, V = self.project(x_t)
        y, new_state = decode_step(A, B * V, state, self.window_blocks, self.block_len)
        Z = y.to(V.dtype) * C + V
        return self.out_proj(Z.reshape(batch, self.inner)), new_state

    @torch.no_grad()
    def decode_(self, x_t: torch.Tensor, data: torch.Tensor, pos: torch.Tensor,
                state_indices: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One token per sequence against a pool of state slots, in place: returns Z ``[B, H*DH]`` (before the
        output projection) and updates rows ``state_indices`` (int64 [B]; default 0..B-1) of ``data``
        (float32 ``[S, H, DH, 2 + 2(k-1)]``). ``pos`` (int64 [S], each slot's tokens so far) is read, not
        advanced: a model's layers share one position per slot, which the caller advances once per step.
        Fixed addresses and no host sync, so one captured CUDA graph replays at every position."""
        P = self.in_proj(x_t)
        return phalanx_decode(P, data, pos, state_indices, heads=self.heads, kv_heads=self.kv_heads,
                              head_dim=self.head_dim, window_blocks=self.window_blocks, block_len=self.block_len,
                              decay_max=self.decay_max)  # fmt: skip
