"""YOCO, "You Only Cache Once" (arXiv 2405.05254): a decoder-decoder language model.

    tokens -> embed -> self-decoder (L_s blocks of sliding-window attention, gated retention or gated DeltaNet)
           -> GlobalKV: K = RoPE(k_proj(norm h)), V = v_proj(norm h)      <- the ONE growing cache
           -> cross-decoder (L - L_s blocks; each its own queries, output and FFN, all reading K/V)
           -> norm -> lm_head

The residual stream entering the cross-decoder is the self-decoder output. The self-decoder's
caches are constant in context (a W-position ring per SWA layer, an fp32 state per retention or DeltaNet layer),
so the cache is ``2 * n_kv * d_h * bytes`` per token plus a constant. Positions whose logits are
not wanted (all prompt tokens but the last) skip the cross-decoder entirely, so prefill costs the
self-decoder plus one K/V projection: O(N).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import ModelCache
from ..config import ConfigError, ModelConfig
from ..layers import RotaryEmbedding, global_positions
from ..mixers.cross_attention import CrossAttention, GlobalKV
from ..mixers.gated_deltanet import GatedDeltaNet
from ..mixers.retention import GatedRetention
from ..mixers.sliding_window import SlidingWindowAttention
from .base import Block, CausalLM, ffn_flops, lm_head_flops


# Each YOCO architecture's self-decoder mixer (the cross-decoder is the same for all). A mixer builds
# its self-decoder layer with ``for_self_decoder(config, plain_rope)`` (``plain_rope(dim)``: the RoPE of
# that head width, if it rotates) and states its cache bytes and prefill FLOPs: a new self-decoder is
# its file and a line here.
SELF_DECODERS: dict[str, type[nn.Module]] = {"yoco-swa": SlidingWindowAttention, "yoco-gret": GatedRetention,
                                             "yoco-gdn": GatedDeltaNet}


class YOCO(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        # the global K/V and the cross-decoder's queries see positions as the config says; the
        # self-decoder always by plain RoPE (a window or a decay never reaches beyond what it trained on)
        self.rotary = global_positions(config, config.head_dim)
        plain: dict[int, RotaryEmbedding] = {}

        def plain_rope(dim: int) -> RotaryEmbedding:
            """One plain RoPE per head width, shared by the self-decoder's layers (and with the global
            attention when that is plain RoPE too), so a call computes its tables once."""
            if dim == config.head_dim and not config.positions_changed:
                return self.rotary
            if dim not in plain:
                plain[dim] = RotaryEmbedding(dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
            return plain[dim]

        mixer = self.self_decoder(config)
        self.self_layers = nn.ModuleList(Block(mixer.for_self_decoder(config, plain_rope), config)
                                         for _ in range(config.self_layers))
        self.global_kv = GlobalKV(config, self.rotary)
        n_cross = config.n_layers - config.self_layers
        self.cross_layers = nn.ModuleList(Block(CrossAttention(config, self.rotary), config) for _ in range(n_cross))
        self.init_weights()

    def cache_owners(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.self_layers] + [self.global_kv]

    def cache_readers(self) -> list[int]:
        return [1] * len(self.self_layers) + [len(self.cross_layers)]  # every cross-decoder layer reads the global K/V

    def residual_blocks(self) -> list[Block]:
        # the self-decoder's output is both the global K/V's input and the cross-decoder's residual stream
        return list(self.self_layers) + list(self.cross_layers)

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def self_decoder(config: ModelConfig) -> type[nn.Module]:
        """The self-decoder's mixer class; a YOCO architecture without one is refused, never guessed."""
        if config.arch not in SELF_DECODERS:
            raise ConfigError(f"unknown YOCO self-decoder for arch {config.arch!r}; the known kinds are "
                              + ", ".join(f"{arch} ({mixer.__name__})" for arch, mixer in SELF_DECODERS.items()))
        return SELF_DECODERS[config.arch]

    @classmethod
    def cache_bytes_per_row(cls, config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        self_decoder = cls.self_decoder(config).cache_bytes_per_row(config, context, dtype)
        return GlobalKV.cache_bytes_per_row(config, context, dtype) + config.self_layers * self_decoder

    @classmethod
    def prefill_flops(cls, config: ModelConfig, n: int) -> float:
        """The self-decoder and the global K/V over all n tokens; the cross-decoder for the last one."""
        n_cross = config.n_layers - config.self_layers
        self_layer = cls.self_decoder(config).prefill_flops(config, n) + ffn_flops(config, n)
        cross_layer = CrossAttention.prefill_flops(config, n, queries=1) + ffn_flops(config, 1)
        return (config.self_layers * self_layer + GlobalKV.prefill_flops(config, n) + n_cross * cross_layer
                + lm_head_flops(config))

    @classmethod
    def quadratic_prefill(cls, config: ModelConfig) -> bool:
        # the cross-decoder runs for the positions with logits only: one in a prefill
        return cls.self_decoder(config).quadratic_prefill(config) or GlobalKV.quadratic_prefill(config)

    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None, pad: torch.Tensor | None = None,
                num_logits: int | None = None, check_ids: bool = True) -> torch.Tensor | None:
        step = self.begin(ids, cache, pad, num_logits, check_ids)
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.self_layers):
            x = layer(x, step, cache[i] if cache is not None else None)
        kv = self.global_kv(x, step, cache[-1] if cache is not None else None)
        if cache is not None:
            cache.seen += step.length
        keep = step.length if num_logits is None else num_logits
        if keep == 0:
            return None
        # Only the positions that need logits go through the cross-decoder.
        x, query_step = x[:, step.length - keep:], step.last(keep)
        for layer in self.cross_layers:  # every one reads the one global K/V through its cache
            x = layer(x, query_step, kv)
        return self.logits(x, None)
