"""Configuration of the Phalanx hybrid language model (a ``transformers.PreTrainedConfig``)."""

from __future__ import annotations

from typing import ClassVar

from swrgen.models._hf import require_transformers

require_transformers("swrgen.models.PhalanxHybridConfig")

from transformers import PreTrainedConfig  # noqa: E402

__all__ = ["LAYER_TYPES", "PHALANX", "PhalanxHybridConfig"]

# What a block's mixer is: a Phalanx layer, causal attention over the whole prefix, or causal attention over
# the last `sliding_window` tokens (the latter for comparisons: bench/serving/decode.py). A Phalanx layer is
# "linear_attention" in transformers' vocabulary (a recurrent state, no per-token KV); "phalanx" is accepted
# as an alias on input.
PHALANX = "linear_attention"
LAYER_TYPES = (PHALANX, "full_attention", "sliding_attention")


class PhalanxHybridConfig(PreTrainedConfig):
    r"""A decoder-only LM of pre-norm blocks (RMSNorm, mixer, RMSNorm, MLP) with a tied or separate head.

    The defaults are the 110M hybrid of ``bench/models/hybrid.py``: D=768, 12 blocks, every third one
    (2, 5, 8, 11) global causal attention (12 heads of 64, RoPE), the other eight Phalanx (head_dim 16,
    k=2, BL=16), GELU MLP of 4D, vocab 32000, tied embeddings.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the usual sizes.
        layer_types: one of ``LAYER_TYPES`` per layer (``"linear_attention"``, alias ``"phalanx"``: a Phalanx
            layer); None = ``"full_attention"`` every ``global_attention_every``-th layer (the last of each
            group), Phalanx elsewhere.
        global_attention_every: see ``layer_types``.
        num_attention_heads, num_key_value_heads (default: heads), head_dim (default: hidden / heads),
        attention_bias: the attention layers (GQA when kv heads < heads).
        sliding_window: tokens a ``"sliding_attention"`` layer sees (itself and the ``sliding_window - 1`` before).
        phalanx_heads (default hidden / phalanx_head_dim), phalanx_head_dim, phalanx_kv_heads, window_blocks,
        block_len, decay_max, phalanx_bias: the :class:`swrgen.nn.Phalanx` layers.
        hidden_act: the MLP's activation (a ``transformers.activations.ACT2FN`` name).
        rms_norm_eps, initializer_range, tie_word_embeddings, use_cache, pad/bos/eos_token_id: as usual.
        rope_parameters: ``{"rope_type": "default", "rope_theta": ...}`` (only the default RoPE is implemented;
            ``rope_theta=`` is accepted too).
    """

    model_type = "phalanx_hybrid"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    layer_types: list[str] | None = None
    global_attention_every: int = 3
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    phalanx_heads: int | None = None
    phalanx_head_dim: int = 16
    phalanx_kv_heads: int | None = None
    window_blocks: int = 2
    block_len: int = 16
    decay_max: float = 0.8
    phalanx_bias: bool = False
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_parameters: dict | None = None
    max_position_embeddings: int = 1 << 20  # informational: nothing here is bounded by it
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        def positive(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PhalanxHybridConfig.{name} must be an int >= 1; got {value!r}")
            return value

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "global_attention_every",
                     "num_attention_heads", "phalanx_head_dim", "window_blocks", "block_len"):  # fmt: skip
            positive(name)
        if self.layer_types is None:
            every = self.global_attention_every
            self.layer_types = [
                "full_attention" if i % every == every - 1 else PHALANX for i in range(self.num_hidden_layers)
            ]
        self.layer_types = [PHALANX if t == "phalanx" else t for t in self.layer_types]
        if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"PhalanxHybridConfig.layer_types must list num_hidden_layers={self.num_hidden_layers} "
                             f"entries from {LAYER_TYPES}; got {self.layer_types}")  # fmt: skip
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        positive("num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")  # fmt: skip
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                 f"{self.num_attention_heads}; pass head_dim explicitly")  # fmt: skip
            self.head_dim = self.hidden_size // self.num_attention_heads
        if positive("head_dim") % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels); got {self.head_dim}")
        if "sliding_attention" in self.layer_types:
            positive("sliding_window")
        if self.phalanx_heads is None:
            if self.hidden_size % self.phalanx_head_dim:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of phalanx_head_dim="
                                 f"{self.phalanx_head_dim}; pass phalanx_heads explicitly")  # fmt: skip
            self.phalanx_heads = self.hidden_size // self.phalanx_head_dim
        if self.phalanx_kv_heads is None:
            self.phalanx_kv_heads = self.phalanx_heads
        positive("phalanx_heads")
        positive("phalanx_kv_heads")
        if not 0 < float(self.decay_max) <= 1:
            raise ValueError(f"decay_max must be in (0, 1]; got {self.decay_max!r}")
        super().__post_init__(**kwargs)  # also standardizes rope_parameters (rope_theta=... becomes a key)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"only the default RoPE is implemented; got rope_type={rope_type!r}")

    def phalanx_kwargs(self) -> dict:
        """The :class:`swrgen.nn.Phalanx` constructor arguments of the Phalanx layers."""
        return dict(heads=self.phalanx_heads, head_dim=self.phalanx_head_dim, kv_heads=self.phalanx_kv_heads,
                    window_blocks=self.window_blocks, block_len=self.block_len, decay_max=float(self.decay_max),
                    bias=self.phalanx_bias)  # fmt: skip
