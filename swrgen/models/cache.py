"""The state-slot cache of the Phalanx hybrid LM (docs/serving.md).

A :class:`PhalanxHybridCache` holds ``S`` slots; a slot is one sequence's whole decoding state:

* per Phalanx layer, a row of a float32 pool ``[S, H, DH, 2 + 2(k-1)]`` (the SWR state
  ``[w, g, v_1..v_{k-1}, P_1..P_{k-1}]`` of :class:`swrgen.ops.swr.state.SwrState`): O(k * H * DH) per layer,
  whatever the length;
* per attention layer, the slot's keys and values ``[S, KVH, capacity, head_dim]`` (``"full_attention"``:
  token ``p`` at index ``p``; ``"sliding_attention"``: a ring of ``sliding_window`` entries, token ``p`` at
  ``p % window``), in the model's dtype, keys after RoPE;
* one int64 ``pos [S]`` on the device, shared by all layers: the tokens the slot has seen. A decode step
  reads it (every layer) and advances it once; ``host_pos`` is the host's exact copy, kept by the code that
  schedules the work (prefill, :meth:`PhalanxHybridForCausalLM.decode_step`, :class:`StateSlots`), so nothing
  reads the device to know a position.

Every tensor keeps its address for the cache's life unless a full-attention buffer has to grow (only when
``max_len`` is None, the ``generate()`` case), so a captured CUDA graph of a decode step stays valid.
With ``generate()`` slot ``b`` is batch row ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swrgen.models._hf import require_transformers

require_transformers("swrgen.models.PhalanxHybridCache")

from transformers.cache_utils import Cache  # noqa: E402

from swrgen.models.configuration_phalanx_hybrid import PHALANX  # noqa: E402
from swrgen.ops.swr.state import state_width  # noqa: E402

__all__ = ["KVSlots", "PhalanxHybridCache", "PhalanxSlots"]

_GROW_ALIGN = 256  # full-attention buffers grow to a multiple of this (and at least double)


class PhalanxSlots:
    """One Phalanx layer's pool of SWR states: ``data`` float32 ``[S, H, DH, 2 + 2(k-1)]``."""

    layer_type = PHALANX
    is_sliding = False
    is_compileable = False
    is_initialized = True
    supports_early_init = False

    def __init__(self, slots: int, heads: int, head_dim: int, window_blocks: int, device: torch.device) -> None:
        self.data = torch.zeros(slots, heads, head_dim, state_width(window_blocks), dtype=torch.float32, device=device)
        self.data[..., 1] = 1.0  # g = 1: the state before the first token

    def reset(self, index: torch.Tensor) -> None:
        self.data.index_fill_(0, index, 0.0)
        self.data[index, :, :, 1] = 1.0

    def select(self, index: torch.Tensor) -> None:
        self.data = self.data.index_select(0, index)

    def nbytes_per_slot(self) -> int:
        return self.data[0].numel() * self.data.element_size()


class KVSlots:
    """One attention layer's keys and values per slot, ``[S, KVH, capacity, head_dim]``; a ring of
    ``window`` entries for sliding-window attention."""

    is_compileable = False
    is_initialized = True
    supports_early_init = False

    def __init__(self, slots: int, kv_heads: int, head_dim: int, capacity: int, window: int | None,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.window = window
        self.layer_type = "full_attention" if window is None else "sliding_attention"
        self.is_sliding = window is not None
        cap = window if window is not None else capacity
        self.keys = torch.zeros(slots, kv_heads, cap, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def grow(self, capacity: int) -> None:
        if self.window is not None or capacity <= self.capacity:
            return
        keys = self.keys.new_zeros(*self.keys.shape[:2], capacity, self.keys.shape[3])
        values = torch.zeros_like(keys)
        keys[:, :, : self.capacity] = self.keys
        values[:, :, : self.capacity] = self.values
        self.keys, self.values = keys, values

    def select(self, index: torch.Tensor) -> None:
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)

    def nbytes_per_slot(self) -> int:
        return 2 * self.keys[0].numel() * self.keys.element_size()

    # -------------------------------------------------------- prefill helpers (host-known positions)

    def context(self, slot: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[KVH, C, hd]`` and absolute positions ``[C]`` (-1: empty) a chunk starting at
        ``start`` can see from before it."""
        device = self.keys.device
        if self.window is None:
            return self.keys[slot, :, :start], self.values[slot, :, :start], torch.arange(start, device=device)
        w = self.window
        j = torch.arange(w, device=device)
        last = start - 1
        p = last - torch.remainder(last - j, w)  # the newest position p <= last with p % w == j
        p = torch.where(p >= 0, p, torch.full_like(p, -1))
        return self.keys[slot], self.values[slot], p

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's keys and values ``[KVH, L, hd]`` (positions ``start ..``)."""
        length = k.shape[1]
        if self.window is None:
            self.keys[slot, :, start : start + length] = k
            self.values[slot, :, start : start + length] = v
            return
        keep = min(length, self.window)  # older tokens of a long chunk are overwritten anyway
        idx = torch.remainder(torch.arange(start + length - keep, start + length, device=k.device), self.window)
        self.keys[slot].index_copy_(1, idx, k[:, length - keep :])
        self.values[slot].index_copy_(1, idx, v[:, length - keep :])


class PhalanxHybridCache(Cache):
    """State slots for every layer of a :class:`PhalanxHybridForCausalLM` (module docstring).

    Args:
        config: the model's :class:`PhalanxHybridConfig`.
        num_slots: S, the sequences it can hold at once.
        max_len: tokens a slot can hold in a full-attention layer; None = grow on demand (what ``generate()``
            uses; growing reallocates, so graphs need a fixed ``max_len``).
        device, dtype: where the buffers live and the attention KV dtype (the model's).
    """

    def __init__(self, config, num_slots: int, *, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1; got {num_slots!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be None (grow on demand) or an int >= 1; got {max_len!r}")
        device = torch.device("cpu" if device is None else device)
        self.config = config
        self.num_slots = num_slots
        self.max_len = max_len
        capacity = max_len if max_len is not None else _GROW_ALIGN
        layers: list[PhalanxSlots | KVSlots] = []
        for kind in config.layer_types:
            if kind == PHALANX:
                layers.append(PhalanxSlots(num_slots, config.phalanx_heads, config.phalanx_head_dim,
                                           config.window_blocks, device))  # fmt: skip
            else:
                window = config.sliding_window if kind == "sliding_attention" else None
                layers.append(KVSlots(num_slots, config.num_key_value_heads, config.head_dim, capacity, window,
                                      dtype, device))  # fmt: skip
        super().__init__(layers=layers)
        self.pos = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.host_pos = [0] * num_slots
        self.seen_tokens = 0  # columns of generate()'s (padded) inputs consumed: what get_seq_length reports
        self.device = device
        self.dtype = dtype

    # -------------------------------------------------------- bookkeeping

    def positions(self, slots: Sequence[int]) -> list[int]:
        return [self.host_pos[s] for s in slots]

    def check_slots(self, slots: Sequence[int]) -> None:
        for s in slots:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.num_slots:
                raise ValueError(f"slot {s!r} is not one of this cache's slots 0..{self.num_slots - 1}")

    def ensure_capacity(self, slots: Sequence[int], new_tokens: Sequence[int] | int) -> None:
        """Make room for ``new_tokens`` more tokens in each of ``slots`` (grow, or raise with a fixed max_len)."""
        if isinstance(new_tokens, int):
            new_tokens = [new_tokens] * len(slots)
        need = max((self.host_pos[s] + n for s, n in zip(slots, new_tokens, strict=True)), default=0)
        limit = self.max_len
        if limit is not None and need > limit:
            raise ValueError(f"a slot would hold {need} tokens but this cache was built with max_len={limit}")
        for layer in self.layers:
            if isinstance(layer, KVSlots) and layer.window is None and need > layer.capacity:
                layer.grow(max(2 * layer.capacity, -(-need // _GROW_ALIGN) * _GROW_ALIGN))

    def advance(self, slots: Sequence[int], lengths: Sequence[int] | int = 1) -> None:
        """Host-side bookkeeping after ``lengths`` tokens went into ``slots`` (the device ``pos`` is advanced by
        the step itself)."""
        if isinstance(lengths, int):
            lengths = [lengths] * len(slots)
        for s, n in zip(slots, lengths, strict=True):
            self.host_pos[s] += n

    def reset_slots(self, slots: Sequence[int]) -> None:
        """Empty ``slots`` (a new sequence starts there): zero states, position 0. Keys and values stay (they
        are masked by the position)."""
        self.check_slots(slots)
        if not slots:
            return
        index = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        for layer in self.layers:
            if isinstance(layer, PhalanxSlots):
                layer.reset(index)
        self.pos.index_fill_(0, index, 0)
        for s in slots:
            self.host_pos[s] = 0

    def nbytes_per_slot(self) -> dict[str, int]:
        """Bytes one slot holds: Phalanx states, attention KV (at the current capacity), total."""
        phalanx = sum(layer.nbytes_per_slot() for layer in self.layers if isinstance(layer, PhalanxSlots))
        kv = sum(layer.nbytes_per_slot() for layer in self.layers if isinstance(layer, KVSlots))
        return {"phalanx_state": phalanx, "attention_kv": kv, "total": phalanx + kv + 8}

    # -------------------------------------------------------- the transformers Cache interface

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of ``generate()``'s inputs consumed so far (padding included, as ``generate`` counts)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_len is None else self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False  # custom ops and host bookkeeping; capture decode steps with DecodeGraph instead

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.num_slots

    def update(self, *args, **kwargs):
        raise NotImplementedError("PhalanxHybridCache is filled by PhalanxHybridForCausalLM itself, not by update()")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PhalanxHybridCache cannot be cropped: the Phalanx states cannot be rolled back")

    def reset(self) -> None:
        self.reset_slots(list(range(self.num_slots)))
        self.seen_tokens = 0

    def _select(self, index: torch.Tensor) -> None:
        index = index.to(device=self.device, dtype=torch.int64)
        host = [self.host_pos[i] for i in index.tolist()]
        for layer in self.layers:
            layer.select(index)
        self.pos = self.pos.index_select(0, index)
        self.host_pos = host
        self.num_slots = len(host)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Slot ``b`` becomes a copy of slot ``beam_idx[b]`` (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(self.num_slots).repeat_interleave(repeats))

    def __repr__(self) -> str:
        kinds = ",".join("P" if isinstance(layer, PhalanxSlots) else "A" for layer in self.layers)
        return f"PhalanxHybridCache(slots={self.num_slots}, max_len={self.max_len}, layers={kinds}, {self.device})"
