"""Causal (grouped-query) softmax self-attention and the Q/K/V projections the attention mixers share.

A mixer attends only through its cache's ``attend`` (the ``AttentionCache`` protocol, ``cache.py``):
a ``KVCache``, a compressed store, or, without a cache, this call's own keys and values (``CallKV``).
The kernels and the one masking rule live in ``kernels.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import CallKV, KVCache, KVGeometry
from ..config import ModelConfig
from ..layers import Linear, RotaryEmbedding, Step, rotate_by


def visible_pairs(n: float, window: int | None = None) -> float:
    """(query, key) pairs a causal attention over n positions computes, each query seeing at most
    ``window`` keys (itself included): its useful work, masked-out pairs not counted."""
    if window is None or window >= n:
        return n * (n + 1) / 2
    return window * (window + 1) / 2 + (n - window) * window


def kv_bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one position's keys and values take in a cache of ``n_kv_heads`` x ``head_dim``."""
    return 2 * config.n_kv_heads * config.head_dim * dtype.itemsize


class QKVProjection(nn.Module):
    """Query/output projections, and key/value projections for a layer that produces its own K/V;
    RoPE on q and k. Shared by the self-attention mixers."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, produces_kv: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        if produces_kv:
            self.k_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.v_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = rotary

    def queries(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """q [B, H, T, d] at the step's positions (RoPE, and a temperature if the positions have one)."""
        B, T, _ = x.shape
        return self.rotary.queries(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), step).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v [B, n_kv, T, d], RoPE on k at the step's positions."""
        B, T, _ = x.shape
        k = self.rotary.keys(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), step)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def qkv(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.queries(x, step), *self.keys_values(x, step))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))


class CausalSelfAttention(QKVProjection):
    """Full causal GQA/MQA self-attention; its cache is a ``KVCache`` of every position.

    Cross-layer sharing (CLA, MLKV): a layer whose ``kv_source`` is an earlier layer has no K/V
    projections and no cache; it attends with its own queries to the K/V (already RoPE'd at their
    true positions) that its source layer left in ``shared`` during the same forward call.
    """

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer: int = 0, kv_source: int | None = None):
        self.layer = layer
        self.kv_source = layer if kv_source is None else kv_source
        super().__init__(config, rotary, produces_kv=self.kv_source == layer)

    @property
    def produces_kv(self) -> bool:
        return self.kv_source == self.layer

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, dtype=dtype, device=device, capacity=capacity)

    def kv_geometry(self) -> KVGeometry:
        return rope_kv_geometry(self)

    def forward(self, x: torch.Tensor, step: Step, cache=None, shared: dict | None = None) -> torch.Tensor:
        """``cache``: this layer's ``AttentionCache`` (None: this call's keys only); ``shared``: the
        caches the producing layers of this call leave for the layers that read their K/V."""
        q = self.queries(x, step)
        if self.produces_kv:
            kv = CallKV() if cache is None else cache
            kv.append(*self.keys_values(x, step))
            if shared is not None:
                shared[self.layer] = kv
        else:
            if shared is None or self.kv_source not in shared:
                raise RuntimeError(f"layer {self.layer} reads the K/V of layer {self.kv_source}, "
                                   "which has not produced them in this forward call")
            kv = shared[self.kv_source]
        return self.out(kv.attend(q, step))

    # ------------------------------------------------------------------ facts from a config
    # A layer reading another's K/V (CLA, MLKV) has no K/V projections and owns no cache: ``produces_kv``.
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype, *, produces_kv: bool = True) -> int:
        """Bytes its ``KVCache`` holds per row at ``context`` positions."""
        return kv_bytes_per_position(config, dtype) * context if produces_kv else 0

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float, *, produces_kv: bool = True, window: int | None = None) -> float:
        """Useful FLOPs over a prefill of ``n`` positions: q, o (and k, v) projections, and QK^T and AV
        over the keys each query may see (at most ``window``; 2 FLOPs per multiply-add)."""
        d, H, dh = config.dim, config.n_heads, config.head_dim
        projections = d * H * dh * 2 + (d * config.n_kv_heads * dh * 2 if produces_kv else 0)
        return 2 * projections * n + 4 * H * dh * visible_pairs(n, window)

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return True  # every position attends to every earlier one


def rope_kv_geometry(mixer: nn.Module) -> KVGeometry:
    """The geometry of a mixer caching RoPE'd keys and values of ``n_kv_heads`` x ``head_dim``."""
    return KVGeometry(mixer.n_kv_heads, mixer.head_dim, mixer.head_dim,
                      rotate=lambda keys, delta: rotate_by(mixer.rotary, keys, delta))


__all__ = ["CausalSelfAttention", "QKVProjection", "kv_bytes_per_position", "rope_kv_geometry", "visible_pairs"]
