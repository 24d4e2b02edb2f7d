"""The Transformer baseline: a standard pre-norm GQA decoder (Llama-style blocks).

With ``config.window`` set, every layer uses sliding-window attention instead: the "window only"
control for retrieval studies (same cache per layer as a YOCO-SWA self-decoder layer).

Cache: ``2 * L * n_kv * d_h * bytes`` per token (full attention), or ``2 * L * n_kv * d_h * W *
bytes`` in all (window only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import ModelCache
from ..config import ModelConfig
from ..layers import RotaryEmbedding
from ..mixers.attention import CausalSelfAttention
from ..mixers.sliding_window import SlidingWindowAttention
from .base import Block, CausalLM


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)

        def mixer() -> nn.Module:
            if config.window is not None:
                return SlidingWindowAttention(config, self.rotary, config.window)
            return CausalSelfAttention(config, self.rotary)

        self.layers = nn.ModuleList(Block(mixer(), config) for _ in range(config.n_layers))
        self.init_weights()

    def cache_owners(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.layers]

    @staticmethod
    def cache_bytes_for(cfg: ModelConfig, batch_size: int, context: int, dtype: torch.dtype) -> int:
        per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize * batch_size
        return per_position * (cfg.window if cfg.window is not None else context)

    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None, pad: torch.Tensor | None = None,
                num_logits: int | None = None) -> torch.Tensor | None:
        step = self.begin(ids, cache, pad, num_logits)
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache[i] if cache is not None else None)
        if cache is not None:
            cache.seen += step.length
        return self.logits(x, num_logits)
