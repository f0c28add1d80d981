"""Continuous batching on state slots, and decode steps captured in CUDA graphs (docs/serving.md).

:class:`StateSlots` is the whole serving loop minus the policy: requests :meth:`~StateSlots.join` (their
prompt is prefilled into a free slot, several prompts packed into one pass), the running ones
:meth:`~StateSlots.step` together (one token each, each at its own position), and a finished one
:meth:`~StateSlots.leave`\\ s (its slot is free at once). Which request runs when is the caller's choice.

:class:`DecodeGraph` captures :meth:`PhalanxHybridModel.decode_core` for a fixed batch size in a CUDA graph.
The cache keeps its addresses and the positions live on the device, so one graph replays at every position,
across tile boundaries included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swrgen.models._hf import require_transformers

require_transformers("swrgen.models.StateSlots")

from swrgen.models.cache import KVSlots, PhalanxHybridCache, PhalanxSlots  # noqa: E402

__all__ = ["DecodeGraph", "StateSlots"]


def _snapshot(cache: PhalanxHybridCache, slots: Sequence[int], columns: int) -> list:
    """What a warm-up of ``columns`` decode steps from position 0 changes in ``slots``: positions, Phalanx
    rows, and the first ``columns`` KV entries (copied out, so the warm-up can be undone; the rest of the KV
    is not touched and not copied)."""
    index = torch.tensor(list(slots), dtype=torch.int64, device=cache.pos.device)
    saved = [(cache.pos, cache.pos.index_select(0, index))]
    for layer in cache.layers:
        if isinstance(layer, PhalanxSlots):
            saved.append((layer.data, layer.data.index_select(0, index)))
        elif isinstance(layer, KVSlots):
            for t in (layer.keys, layer.values):
                head = t[:, :, : min(columns, t.shape[2])]
                saved.append((head, head.index_select(0, index)))
    return saved


def _restore(saved: list, slots: Sequence[int]) -> None:
    index = torch.tensor(list(slots), dtype=torch.int64, device=saved[0][0].device)
    for t, rows in saved:
        t.index_copy_(0, index, rows)


class DecodeGraph:
    """One decode step of ``model`` for ``batch_size`` sequences, captured in a CUDA graph.

    ``graph(input_ids, slots)`` copies the tokens (``[B]`` int64 on the GPU) and, when they changed, the slot
    ids into the graph's input buffers, replays, does the host bookkeeping and returns the logits ``[B, V]``
    (the graph's output buffer: copy it to keep it past the next call). ``indexed=False`` captures slots
    ``0..B-1`` without a slot gather (``graph(input_ids)``): the fastest form, when batch row b is slot b.

    The cache needs a fixed ``max_len`` (growing would move its buffers). Capturing runs the step twice
    first (warm-up, on slots ``0..B-1`` from position 0); what it changes there is restored afterwards, so
    the cache's contents do not change.
    """

    def __init__(self, model, cache: PhalanxHybridCache, batch_size: int, *, indexed: bool = True,
                 warmup: int = 2) -> None:  # fmt: skip
        if not torch.cuda.is_available() or cache.pos.device.type != "cuda":
            raise ValueError("DecodeGraph needs a cache on a CUDA device")
        if cache.max_len is None:
            raise ValueError("DecodeGraph needs a cache with a fixed max_len (a growing cache moves its buffers)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= cache.num_slots:
            raise ValueError(f"batch_size must be an int in 1..{cache.num_slots} (the cache's slots); "
                             f"got {batch_size!r}")  # fmt: skip
        self.model, self.cache, self.batch_size, self.indexed = model, cache, batch_size, indexed
        device = cache.pos.device
        self.input_ids = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.slots: list[int] = list(range(batch_size))
        self.state_indices = torch.arange(batch_size, dtype=torch.int64, device=device) if indexed else None
        saved = _snapshot(cache, self.slots, warmup)
        cache.pos[:batch_size] = 0  # the warm-up steps write KV entries 0..warmup-1 of these slots
        step = self._step
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # plans, kernels and library handles get made outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = step()
        _restore(saved, self.slots)

    def _step(self) -> torch.Tensor:
        hidden = self.model.model.decode_core(self.cache, self.input_ids, None, self.state_indices)
        return self.model.lm_head(hidden)

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
        if slots is None:
            if self.indexed:
                raise ValueError("this graph was captured with indexed=True: pass the slots")
            slots = self.slots
        else:
            slots = list(slots)
            if not self.indexed and slots != self.slots:
                raise ValueError(f"this graph decodes slots 0..{self.batch_size - 1} (indexed=False); got {slots}")
        if len(slots) != self.batch_size or len(set(slots)) != len(slots):
            raise ValueError(f"need {self.batch_size} distinct slots; got {slots}")
        self.cache.check_slots(slots)
        self.cache.ensure_capacity(slots, 1)  # raises past max_len: the graph itself checks nothing
        self.input_ids.copy_(input_ids.reshape(-1))
        if slots != self.slots:  # a blocking copy: the graph reads the buffer when it runs
            self.state_indices.copy_(torch.tensor(slots, dtype=torch.int64))
            self.slots = slots
        self.graph.replay()
        self.cache.advance(slots, 1)
        return self.logits


class StateSlots:
    """Continuous batching over ``num_slots`` state slots of ``model`` (no scheduler: the caller decides).

    Each running request owns one slot of a :class:`PhalanxHybridCache` (Phalanx states, attention KV, its
    position); requests join and leave while others keep decoding, each at its own position.

    Args:
        model: a :class:`PhalanxHybridForCausalLM` (eval mode).
        num_slots: requests that can run at once.
        max_len: tokens a request may reach (prompt + generated), for the full-attention KV.
        cuda_graphs: run :meth:`step` through one :class:`DecodeGraph` per batch size seen (CUDA only).
    """

    def __init__(self, model, num_slots: int, max_len: int, *, cuda_graphs: bool = False) -> None:
        self.model = model
        self.cache: PhalanxHybridCache = model.new_cache(num_slots, max_len)
        self.free: list[int] = list(range(num_slots))
        self.active: set[int] = set()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, DecodeGraph] = {}
        if cuda_graphs and self.cache.pos.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")

    def position(self, slot: int) -> int:
        """Tokens the request in ``slot`` has seen."""
        return self.cache.host_pos[slot]

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"{n} requests want to join but only {len(self.free)} of {self.cache.num_slots} slots "
                               "are free; let some leave first")  # fmt: skip
        slots, self.free = self.free[:n], self.free[n:]
        self.cache.reset_slots(slots)
        self.active.update(slots)
        return slots

    def join(self, prompts: Sequence[Sequence[int] | torch.Tensor], *,
             chunk_size: int | None = None) -> tuple[list[int], torch.Tensor]:  # fmt: skip
        """Prefill each prompt into a free slot (all in one packed pass; with ``chunk_size``, in chunks of that
        many tokens, each resuming its slot mid-tile). Returns the slots and the logits ``[n, V]`` after each
        prompt's last token."""
        if not prompts:
            raise ValueError("join needs at least one prompt")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):  # fmt: skip
            raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
        ids = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in prompts]
        if min(int(t.numel()) for t in ids) < 1:
            raise ValueError("every prompt needs at least one token")
        slots = self._take(len(ids))
        try:
            if chunk_size is None:
                return slots, self.model.prefill(self.cache, ids, slots)
            logits: list[torch.Tensor | None] = [None] * len(ids)
            offset = 0
            while True:
                part = [(i, t[offset : offset + chunk_size]) for i, t in enumerate(ids) if t.numel() > offset]
                if not part:
                    break
                out = self.model.prefill(self.cache, [t for _, t in part], [slots[i] for i, _ in part])
                for row, (i, _) in enumerate(part):
                    logits[i] = out[row]
                offset += chunk_size
            return slots, torch.stack(logits)
        except Exception:
            self.leave(slots)
            raise

    def extend(self, slot: int, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append several tokens to a running request (its slot continues mid-tile); the logits ``[V]`` after
        the last one."""
        self._check_active([slot])
        return self.model.prefill(self.cache, [tokens], [slot])[0]

    def step(self, tokens: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """One token for each running request in ``slots`` (``tokens`` ``[B]``): the logits ``[B, V]``."""
        slots = list(slots)
        self._check_active(slots)
        if not self.cuda_graphs:
            return self.model.decode_step(tokens, self.cache, slots)
        graph = self._graphs.get(len(slots))
        if graph is None:
            graph = self._graphs[len(slots)] = DecodeGraph(self.model, self.cache, len(slots))
        return graph(tokens.to(self.cache.pos.device), slots).clone()

    def leave(self, slots: int | Sequence[int]) -> None:
        """Finished requests give their slots back (usable by the next join at once)."""
        slots = [slots] if isinstance(slots, int) else list(slots)
        self._check_active(slots)
        for s in slots:
            self.active.discard(s)
            self.free.append(s)

    def _check_active(self, slots: Sequence[int]) -> None:
        idle = [s for s in slots if s not in self.active]
        if idle:
            raise ValueError(f"slots {idle} hold no running request (active: {sorted(self.active)})")
