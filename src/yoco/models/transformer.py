"""The Transformer baseline and its KV-reduction family: a pre-norm decoder (Llama-style blocks).

- MHA / GQA / MQA: ``n_kv_heads`` K/V heads shared by groups of query heads.
- MLA (``attention="mla"``): each layer caches only a normed latent of rank d_c and one decoupled
  RoPE key of d_R, and decodes with the up-projections absorbed (``mixers/mla.py``).
- CLA / MLKV (``cla_factor`` / ``mlkv_layers``): only some layers produce K/V (or an MLA latent); the
  others read a producer's through ``config.kv_sources``, one mechanism for both.
- ``window``: sliding-window attention in every layer, the "window only" control.

Cache per token: ``2 * P * n_kv * d_h * bytes`` with P producing layers (P = L without sharing), or
``P * (d_c + d_R) * bytes`` for MLA; ``2 * L * n_kv * d_h * W * bytes`` in all with a window.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import ModelCache
from ..config import ConfigError, ModelConfig
from ..layers import RotaryEmbedding, global_positions
from ..mixers.attention import CausalSelfAttention
from ..mixers.mla import MultiHeadLatentAttention
from ..mixers.sliding_window import SlidingWindowAttention
from .base import Block, CausalLM, ffn_flops, lm_head_flops

# The token mixer of each ``attention`` kind (without a sliding window).
ATTENTION_MIXERS: dict[str, type[nn.Module]] = {"gqa": CausalSelfAttention, "mla": MultiHeadLatentAttention}


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rotary = global_positions(config, config.head_dim)  # every layer is global attention
        sources = config.kv_sources
        if config.attention == "mla":
            self.rope_key_rotary = RotaryEmbedding(config.mla_rope_dim, config.rope_theta, config.rope_freqs,
                                                   config.rope_pairs)

        kind = self.mixer_class(config)

        def mixer(i: int) -> nn.Module:
            if kind is SlidingWindowAttention:
                return SlidingWindowAttention(config, self.rotary, config.window)
            if kind is MultiHeadLatentAttention:
                return MultiHeadLatentAttention(config, self.rope_key_rotary, layer=i, kv_source=sources[i])
            return CausalSelfAttention(config, self.rotary, layer=i, kv_source=sources[i])

        self.layers = nn.ModuleList(Block(mixer(i), config) for i in range(config.n_layers))
        # Which ModelCache entry each layer writes (producers only; None for layers reading another's).
        producers = [i for i, src in enumerate(sources) if src == i]
        self.cache_slot = [producers.index(i) if i in producers else None for i in range(config.n_layers)]
        self.init_weights()

    def cache_owners(self) -> list[nn.Module]:
        return [layer.mixer for layer, slot in zip(self.layers, self.cache_slot) if slot is not None]

    def cache_readers(self) -> list[int]:
        attended = [self.cache_slot[source] for source in self.config.kv_sources]  # the slot each layer reads
        return [attended.count(slot) for slot in range(len(self.cache_owners()))]

    def residual_blocks(self) -> list[Block]:
        return list(self.layers)

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def mixer_class(config: ModelConfig) -> type[nn.Module]:
        """Every layer's token mixer: sliding-window attention with a window, else the ``attention`` kind."""
        if config.window is not None:
            return SlidingWindowAttention
        if config.attention not in ATTENTION_MIXERS:
            raise ConfigError(f"unknown Transformer attention {config.attention!r}; "
                              f"choose one of {', '.join(ATTENTION_MIXERS)}")
        return ATTENTION_MIXERS[config.attention]

    @classmethod
    def layer_mixers(cls, config: ModelConfig) -> list[tuple[type[nn.Module], dict]]:
        """(mixer class, the keyword arguments of its facts) per layer: under CLA / MLKV a layer reading
        another's K/V produces none (a sliding window has no sharing: every layer its own ring)."""
        mixer = cls.mixer_class(config)
        if mixer is SlidingWindowAttention:
            return [(mixer, {})] * config.n_layers
        return [(mixer, {"produces_kv": source == i}) for i, source in enumerate(config.kv_sources)]

    @classmethod
    def cache_bytes_per_row(cls, config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        return sum(mixer.cache_bytes_per_row(config, context, dtype, **role) for mixer, role in cls.layer_mixers(config))

    @classmethod
    def prefill_flops(cls, config: ModelConfig, n: int) -> float:
        layers = sum(mixer.prefill_flops(config, n, **role) + ffn_flops(config, n)
                     for mixer, role in cls.layer_mixers(config))
        return layers + lm_head_flops(config)

    @classmethod
    def quadratic_prefill(cls, config: ModelConfig) -> bool:
        return cls.mixer_class(config).quadratic_prefill(config)

    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None, pad: torch.Tensor | None = None,
                num_logits: int | None = None, check_ids: bool = True) -> torch.Tensor | None:
        step = self.begin(ids, cache, pad, num_logits, check_ids)
        x = self.embed_tokens(ids)
        # K/V (or latents) produced in this call, for the layers that read another layer's.
        share = {} if self.config.window is None else None
        for layer, slot in zip(self.layers, self.cache_slot):
            layer_cache = cache[slot] if cache is not None and slot is not None else None
            if share is None:
                x = layer(x, step, layer_cache)
            else:
                x = layer(x, step, layer_cache, shared=share)
        if cache is not None:
            cache.seen += step.length
        return self.logits(x, num_logits)
