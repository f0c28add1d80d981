"""The Phalanx hybrid language model, Hugging Face compatible (docs/serving.md).

Pre-norm blocks ``h = h + mixer(norm(h)); h = h + mlp(norm(h))`` whose mixer is a :class:`swrgen.nn.Phalanx`
layer (``"linear_attention"``) or causal attention with RoPE (``"full_attention"``, or ``"sliding_attention"`` over
the last ``sliding_window`` tokens), then a final RMSNorm and the LM head (tied to the embeddings by default).

How a forward sees its tokens:

* Every row of ``input_ids`` is one sequence: its tokens are those where ``attention_mask`` is 1 (any
  padding, left or right), and each sequence runs alone. Rows without padding run as one dense batch; rows
  with padding are packed (the Phalanx layers take ``cu_seqlens``, attention runs per sequence) and the
  outputs go back to their places (zeros at the padding). So a left-padded batch gives, for every row,
  what that prompt alone gives, which is what ``generate()`` expects. Positions (RoPE, the Phalanx tiles)
  count a sequence's own tokens from 0; no ``position_ids`` are taken.
* With a :class:`~swrgen.models.cache.PhalanxHybridCache` (``use_cache``, created on the first call when
  none is passed) row ``b`` continues slot ``b``: a prefill writes each Phalanx layer's final state and the
  attention keys and values into the slot; a one-token call after that is a decode step
  (:meth:`PhalanxHybridModel.decode_core`: ``Phalanx.decode_`` on the state pools in place, one KV write per
  attention layer, one shared position per slot advanced once).

On CPU everything runs the torch references (float64 works, for exact tests); on CUDA the Phalanx layers
run the generated kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swrgen.models._hf import require_transformers

require_transformers("swrgen.models.PhalanxHybridForCausalLM")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast  # noqa: E402

from swrgen.models.cache import KVSlots, PhalanxHybridCache, PhalanxSlots  # noqa: E402
from swrgen.models.configuration_phalanx_hybrid import PHALANX, PhalanxHybridConfig  # noqa: E402
from swrgen.nn import Phalanx  # noqa: E402
from swrgen.ops.swr.state import SwrState  # noqa: E402

__all__ = ["PhalanxHybridForCausalLM", "PhalanxHybridModel", "PhalanxHybridPreTrainedModel"]

# transformers 5.17 hands the cache to forward() and back as `past_key_values`; later 5.x releases call it
# `cache` (and keep `past_key_values` as a deprecated alias). Both are taken; outputs use the release's name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(past_key_values: PhalanxHybridCache | None, cache: PhalanxHybridCache | None):
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where RoPE angles and softmax are computed: float64 for a float64 model (exact CPU tests), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``cos, sin`` ``[*positions.shape, head_dim]`` of the default RoPE (``rotate_half`` layout)."""
    acc = _acc_dtype(dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=acc, device=positions.device) / head_dim))
    angles = positions.to(acc).unsqueeze(-1) * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., heads, head_dim]``; ``cos, sin`` ``[..., head_dim]`` (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


@dataclass
class _Layout:
    """How a forward's tokens are laid out: ``dense`` (x ``[B, L, D]``, B sequences of ``L`` tokens that all
    start at the same position) or packed (x ``[1, T, D]``, sequences back to back)."""

    dense: bool
    lengths: list[int]  # tokens of each sequence in this call
    starts: list[int]  # each sequence's position before this call (0 without a cache)
    slots: list[int] | None  # the cache slot of each sequence (None: no cache)


class PhalanxHybridMLP(nn.Module):
    def __init__(self, config: PhalanxHybridConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PhalanxHybridAttention(nn.Module):
    """Causal attention with RoPE and grouped KV heads; ``window`` = sliding-window attention (a token sees
    itself and the ``window - 1`` before it)."""

    def __init__(self, config: PhalanxHybridConfig, window: int | None) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = window
        self.theta = float(config.rope_parameters["rope_theta"])
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[..., D]``, ``positions`` broadcastable to ``x.shape[:-1]`` -> q ``[..., H, hd]``, k, v
        ``[..., KVH, hd]`` (q and k rotated)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def chunk(self, x: torch.Tensor, start: int,
              context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Sequences ``x`` ``[N, L, D]`` at positions ``start .. start+L-1`` attending to themselves and to
        ``context`` (keys, values ``[N, KVH, C, hd]`` and their positions ``[C]``, -1 = empty).
        Returns ``(out [N, L, D], k, v [N, KVH, L, hd])``."""
        n, length, _ = x.shape
        q_pos = torch.arange(start, start + length, device=x.device)
        q, k, v = self._qkv(x, q_pos)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, heads, L, hd]
        gqa = self.kv_heads != self.heads
        if context is None and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if context is None:
                keys, values, k_pos = k, v, q_pos
            else:
                keys, values = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
                k_pos = torch.cat([context[2], q_pos])
            diff = q_pos[:, None] - k_pos[None, :]
            mask = (k_pos[None, :] >= 0) & (diff >= 0)
            if self.window is not None:
                mask &= diff < self.window
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = self.o_proj(o.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))
        return out, k, v

    def decode(self, x: torch.Tensor, kv: KVSlots, positions: torch.Tensor,
               state_indices: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """One token per sequence ``x`` ``[B, D]`` at ``positions`` ``[B]`` (device): write its key and value into
        its slot (``state_indices``; None = slot b), attend over the slot, return ``[B, D]``. Fixed shapes and
        addresses, no host sync (capturable)."""
        batch = x.shape[0]
        q, k, v = self._qkv(x, positions)  # [B, H, hd], [B, KVH, hd]
        rows = torch.arange(batch, device=x.device) if state_indices is None else state_indices
        where = positions if kv.window is None else torch.remainder(positions, kv.window)
        heads = torch.arange(self.kv_heads, device=x.device)
        index = (rows[:, None], heads[None, :], where[:, None])
        kv.keys.index_put_(index, k)
        kv.values.index_put_(index, v)
        if state_indices is None:
            keys, values = kv.keys[:batch], kv.values[:batch]
        else:  # a gather: costs one more pass over those slots' KV
            keys, values = kv.keys.index_select(0, state_indices), kv.values.index_select(0, state_indices)
        groups = self.heads // self.kv_heads
        qg = q.view(batch, self.kv_heads, groups, self.head_dim)
        acc = _acc_dtype(x.dtype)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).to(acc) * (self.head_dim**-0.5)  # [B, KVH, G, cap]
        j = torch.arange(kv.capacity, device=x.device)
        valid = j[None, :] <= positions[:, None]  # full: tokens 0..pos; a ring: its filled entries
        if kv.window is not None:
            valid |= positions[:, None] >= kv.window
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [B, KVH, G, hd]
        return self.o_proj(o.reshape(batch, self.heads * self.head_dim))


class PhalanxHybridDecoderLayer(nn.Module):
    def __init__(self, config: PhalanxHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == PHALANX:
            self.mixer: nn.Module = Phalanx(config.hidden_size, **config.phalanx_kwargs())
        else:
            window = config.sliding_window if self.layer_type == "sliding_attention" else None
            self.mixer = PhalanxHybridAttention(config, window)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PhalanxHybridMLP(config)


class PhalanxHybridPreTrainedModel(PreTrainedModel):
    config: PhalanxHybridConfig
    config_class = PhalanxHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["PhalanxHybridDecoderLayer"]  # noqa: RUF012
    _skip_keys_device_placement = ["past_key_values", "cache"]  # noqa: RUF012
    _supports_sdpa = True  # attention always runs torch SDPA (prefill) or a matmul decode; nothing else
    _is_stateful = True  # recurrent states: no rollback (assisted generation, cropping)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the first forward creates a PhalanxHybridCache and returns
        # it as past_key_values (the route transformers keeps for models with their own cache).
        return False


def _check_kwargs(kwargs: dict) -> None:
    for name in ("position_ids", "cache_position", "token_type_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not taken: positions count each sequence's own tokens (attention_mask marks "
                             "them) and the cache's slots carry them across calls")  # fmt: skip


class PhalanxHybridModel(PhalanxHybridPreTrainedModel):
    def __init__(self, config: PhalanxHybridConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PhalanxHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    # -------------------------------------------------------- prefill and full forward

    def _phalanx(self, mixer: Phalanx, x: torch.Tensor, layout: _Layout, slots: PhalanxSlots | None) -> torch.Tensor:
        cu = None
        if not layout.dense:
            cu = [0]
            for n in layout.lengths:
                cu.append(cu[-1] + n)
        if slots is None:
            return mixer(x, cu_seqlens=cu)
        index = torch.tensor(layout.slots, dtype=torch.int64, device=x.device)
        state = None
        if any(layout.starts):  # continue the slots (chunked prefill, a prompt after a decode, ...)
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            state = SwrState(slots.data.index_select(0, index).to(dtype), layout.starts, mixer.block_len)
        y, new = mixer(x, state=state, return_state=True, cu_seqlens=cu)
        slots.data.index_copy_(0, index, new.data.detach().to(torch.float32))
        return y

    def _attention(self, attn: PhalanxHybridAttention, x: torch.Tensor, layout: _Layout,
                   kv: KVSlots | None) -> torch.Tensor:  # fmt: skip
        if layout.dense:
            start = layout.starts[0]
            context = None
            if kv is not None and start > 0:
                parts = [kv.context(s, start) for s in layout.slots]
                context = (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), parts[0][2])
            out, k, v = attn.chunk(x, start, context)
            if kv is not None:
                for b, s in enumerate(layout.slots):
                    kv.write(s, start, k[b].detach(), v[b].detach())
            return out
        outs, offset = [], 0
        for i, (n, start) in enumerate(zip(layout.lengths, layout.starts, strict=True)):
            part = x[:, offset : offset + n]
            offset += n
            context = None
            if kv is not None and start > 0:
                ck, cv, cp = kv.context(layout.slots[i], start)
                context = (ck[None], cv[None], cp)
            out, k, v = attn.chunk(part, start, context)
            if kv is not None:
                kv.write(layout.slots[i], start, k[0].detach(), v[0].detach())
            outs.append(out)
        return torch.cat(outs, dim=1)

    def run(self, x: torch.Tensor, layout: _Layout, cache: PhalanxHybridCache | None,
            hidden_states: list | None = None) -> torch.Tensor:  # fmt: skip
        """All blocks and the final norm over tokens ``x`` laid out as ``layout``; with a cache, the tokens are
        appended to ``layout.slots`` (states, KV, positions)."""
        if cache is not None:
            cache.ensure_capacity(layout.slots, layout.lengths)
        h = x
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(h)
            a = layer.input_layernorm(h)
            store = None if cache is None else cache.layers[i]
            if layer.layer_type == PHALANX:
                a = self._phalanx(layer.mixer, a, layout, store)
            else:
                a = self._attention(layer.mixer, a, layout, store)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if cache is not None:
            index = torch.tensor(layout.slots, dtype=torch.int64, device=cache.pos.device)
            cache.pos.index_add_(0, index, torch.tensor(layout.lengths, dtype=torch.int64, device=cache.pos.device))
            cache.advance(layout.slots, layout.lengths)
        return self.norm(h)

    # -------------------------------------------------------- decode

    def decode_core(self, cache: PhalanxHybridCache, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None,
                    state_indices: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One token per sequence (``input_ids`` ``[B]`` or ``inputs_embeds`` ``[B, D]``) for slots
        ``state_indices`` (int64 ``[B]`` on the device; None = slots 0..B-1): the final normed hidden states
        ``[B, D]``. Updates the slots' states and KV in place and advances ``cache.pos`` by one; touches no host
        bookkeeping and syncs nothing, so a CUDA graph captures it (:class:`~swrgen.models.serving.DecodeGraph`).
        :meth:`PhalanxHybridForCausalLM.decode_step` is the checked, bookkept way to call it."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch = h.shape[0]
        positions = cache.pos[:batch] if state_indices is None else cache.pos.index_select(0, state_indices)
        for i, layer in enumerate(self.layers):
            a = layer.input_layernorm(h)
            store = cache.layers[i]
            if layer.layer_type == PHALANX:
                a = layer.mixer.out_proj(layer.mixer.decode_(a, store.data, cache.pos, state_indices))
            else:
                a = layer.mixer.decode(a, store, positions, state_indices)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if state_indices is None:
            cache.pos[:batch].add_(1)
        else:
            cache.pos.index_add_(0, state_indices, torch.ones_like(state_indices))
        return self.norm(h)

    # -------------------------------------------------------- transformers forward

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: PhalanxHybridCache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                cache: PhalanxHybridCache | None = None, **kwargs) -> BaseModelOutputWithPast | tuple:  # fmt: skip
        _check_kwargs(kwargs)
        past_key_values = _one_cache(past_key_values, cache)
        if output_attentions:
            raise ValueError("output_attentions is not supported (attention runs fused SDPA; Phalanx has none)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3:
            raise ValueError(f"input_ids must be [B, L] (inputs_embeds [B, L, D]); got {list(h.shape[:-1])}")
        batch, length = h.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = past_key_values
        if cache is not None and not isinstance(cache, PhalanxHybridCache):
            raise TypeError(f"past_key_values must be a PhalanxHybridCache (or None: one is made); got "
                            f"{type(cache).__name__}")  # fmt: skip
        if cache is None and use_cache:
            cache = PhalanxHybridCache(self.config, batch, device=h.device, dtype=h.dtype)
        if cache is not None and cache.num_slots != batch:
            raise ValueError(f"the cache has {cache.num_slots} slots but the batch has {batch} rows "
                             "(row b uses slot b)")  # fmt: skip
        hidden_states: list | None = [] if output_hidden_states else None

        if cache is not None and length == 1 and cache.seen_tokens > 0 and not output_hidden_states:
            # A decode step: every row gets one token (generate() never pads a generated token).
            slots = list(range(batch))
            cache.ensure_capacity(slots, 1)
            out = self.decode_core(cache, inputs_embeds=h[:, 0])[:, None]
            cache.advance(slots, 1)
            cache.seen_tokens += 1
        else:
            valid = None if attention_mask is None else attention_mask[:, -length:].bool()
            lengths = [length] * batch if valid is None else valid.sum(dim=1).tolist()
            starts = [0] * batch if cache is None else cache.positions(range(batch))
            if all(n == length for n in lengths) and len(set(starts)) == 1:
                layout = _Layout(True, lengths, starts, None if cache is None else list(range(batch)))
                out = self.run(h, layout, cache, hidden_states)
            else:
                if valid is None:
                    valid = torch.ones(batch, length, dtype=torch.bool, device=h.device)
                rows = [b for b in range(batch) if lengths[b] > 0]
                layout = _Layout(False, [lengths[b] for b in rows], [starts[b] for b in rows],
                                 None if cache is None else rows)  # fmt: skip
                packed = self.run(h[valid][None], layout, cache, hidden_states)
                out = h.new_zeros(batch, length, packed.shape[-1])
                out[valid] = packed[0]
                if hidden_states is not None:
                    for i, hs in enumerate(hidden_states):
                        full = h.new_zeros(batch, length, hs.shape[-1])
                        full[valid] = hs[0]
                        hidden_states[i] = full
            if cache is not None:
                cache.seen_tokens += length
        if hidden_states is not None:
            hidden_states.append(out)
        states = None if hidden_states is None else tuple(hidden_states)
        result = BaseModelOutputWithPast(last_hidden_state=out, hidden_states=states, **{CACHE_FIELD: cache})
        return result if return_dict is not False else result.to_tuple()


class PhalanxHybridForCausalLM(PhalanxHybridPreTrainedModel, GenerationMixin):
    """The LM: :class:`PhalanxHybridModel` and a head (tied to the embeddings when ``tie_word_embeddings``).

    ``generate()`` works as for any transformers decoder (left-padded batches with their ``attention_mask``;
    greedy, sampling, beam search); the cache is a :class:`PhalanxHybridCache` it gets from the first forward.
    Serving: :meth:`prefill` and :meth:`decode_step` on a cache of slots (see :class:`StateSlots`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: PhalanxHybridConfig) -> None:
        super().__init__(config)
        self.model = PhalanxHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: PhalanxHybridCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                cache: PhalanxHybridCache | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:  # fmt: skip
        """``input_ids`` ``[B, L]`` (rows are sequences; ``attention_mask`` marks their tokens) -> logits
        ``[B, L, V]`` (the last ``logits_to_keep`` positions when > 0); ``labels`` give the shifted
        cross-entropy loss (``-100`` ignored). ``past_key_values``: a :class:`PhalanxHybridCache` to continue
        (``use_cache`` makes one when None; ``cache`` is the same argument under transformers' newer name)."""
        _check_kwargs(kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             past_key_values=_one_cache(past_key_values, cache),
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                             return_dict=True)  # fmt: skip
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})  # fmt: skip
        return result if return_dict is not False else result.to_tuple()

    # -------------------------------------------------------- serving

    def new_cache(self, num_slots: int, max_len: int | None = None) -> PhalanxHybridCache:
        """An empty :class:`PhalanxHybridCache` of ``num_slots`` slots on the model's device and dtype."""
        return PhalanxHybridCache(self.config, num_slots, max_len=max_len, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def prefill(self, cache: PhalanxHybridCache, sequences: Sequence[Sequence[int] | torch.Tensor],
                slots: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """Append ``sequences[i]`` (token ids, at least one each) to slot ``slots[i]``, all in one packed pass
        (each slot continues from its own position, mid-tile included): the logits ``[n, V]`` after each
        sequence's last token."""
        slots = list(slots)
        if len(slots) != len(sequences) or not slots:
            raise ValueError(f"need one slot per sequence and at least one; got {len(sequences)} sequences, "
                             f"{len(slots)} slots")  # fmt: skip
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct; got {slots}")
        cache.check_slots(slots)
        ids = [torch.as_tensor(s, dtype=torch.int64, device=self.device).reshape(-1) for s in sequences]
        lengths = [int(t.numel()) for t in ids]
        if min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token; got lengths {lengths}")
        layout = _Layout(len(ids) == 1, lengths, cache.positions(slots), slots)
        hidden = self.model.run(self.model.embed_tokens(torch.cat(ids))[None], layout, cache)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        return self.lm_head(hidden[0, ends])

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: PhalanxHybridCache,
                    slots: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """One token per sequence: ``input_ids`` ``[B]`` for slots ``slots`` (host ints; None = 0..B-1), each at
        its own position; returns the logits ``[B, V]``. The device work is :meth:`PhalanxHybridModel.decode_core`
        (what a CUDA graph captures); this adds the checks and the host bookkeeping."""
        ids = input_ids.reshape(-1)
        batch = ids.shape[0]
        if slots is None:
            if batch > cache.num_slots:
                raise ValueError(f"{batch} tokens but the cache has {cache.num_slots} slots")
            host, index = list(range(batch)), None
        else:
            host = list(slots)
            if len(host) != batch or len(set(host)) != batch:
                raise ValueError(f"need {batch} distinct slots, one per token; got {host}")
            cache.check_slots(host)
            index = torch.tensor(host, dtype=torch.int64, device=cache.pos.device)
        cache.ensure_capacity(host, 1)
        hidden = self.model.decode_core(cache, ids, None, index)
        cache.advance(host, 1)
        return self.lm_head(hidden)


AutoConfig.register(PhalanxHybridConfig.model_type, PhalanxHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(PhalanxHybridConfig, PhalanxHybridForCausalLM, exist_ok=True)
