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
from ..config import ModelConfig
from ..layers import RotaryEmbedding
from ..mixers.attention import CausalSelfAttention
from ..mixers.mla import MultiHeadLatentAttention
from ..mixers.sliding_window import SlidingWindowAttention
from .base import Block, CausalLM


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
        sources = config.kv_sources
        if config.attention == "mla":
            self.rope_key_rotary = RotaryEmbedding(config.mla_rope_dim, config.rope_theta, config.rope_freqs,
                                                   config.rope_pairs)

        def mixer(i: int) -> nn.Module:
            if config.window is not None:
                return SlidingWindowAttention(config, self.rotary, config.window)
            if config.attention == "mla":
                return MultiHeadLatentAttention(config, self.rope_key_rotary, layer=i, kv_source=sources[i])
            return CausalSelfAttention(config, self.rotary, layer=i, kv_source=sources[i])

        self.layers = nn.ModuleList(Block(mixer(i), config) for i in range(config.n_layers))
        # Which ModelCache entry each layer writes (producers only; None for layers reading another's).
        producers = [i for i, src in enumerate(sources) if src == i]
        self.cache_slot = [producers.index(i) if i in producers else None for i in range(config.n_layers)]
        self.init_weights()

    def cache_owners(self) -> list[nn.Module]:
        return [layer.mixer for layer, slot in zip(self.layers, self.cache_slot) if slot is not None]

    def residual_blocks(self) -> list[Block]:
        return list(self.layers)

    @staticmethod
    def cache_bytes_for(cfg: ModelConfig, batch_size: int, context: int, dtype: torch.dtype) -> int:
        if cfg.window is not None:
            return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize * batch_size * cfg.window
        producers = len(set(cfg.kv_sources))
        if cfg.attention == "mla":
            per_layer = cfg.mla_kv_rank + cfg.mla_rope_dim
        else:
            per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
        return producers * per_layer * dtype.itemsize * batch_size * context

    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None, pad: torch.Tensor | None = None,
                num_logits: int | None = None) -> torch.Tensor | None:
        step = self.begin(ids, cache, pad, num_logits)
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
