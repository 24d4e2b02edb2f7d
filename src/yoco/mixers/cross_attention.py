"""YOCO's global K/V and the cross-attention that every cross-decoder layer runs against it."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import CallKV, KVCache, KVGeometry
from ..config import ModelConfig
from ..layers import Linear, RMSNorm, RotaryEmbedding, Step
from .attention import kv_bytes_per_position, rope_kv_geometry, visible_pairs


class GlobalKV(nn.Module):
    """Builds the one K/V cache of a YOCO model from the self-decoder output.

    ``K = RoPE(k_proj(RMSNorm(h)))``, ``V = v_proj(RMSNorm(h))`` with n_kv heads; cached once and read
    by every cross-decoder layer. ``rotary``: the global attention's positions (``global_positions``:
    RoPE, extended RoPE or none).
    """

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.k_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.rotary = rotary

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, dtype=dtype, device=device, capacity=capacity)

    def kv_geometry(self) -> KVGeometry:
        return rope_kv_geometry(self)

    def forward(self, x: torch.Tensor, step: Step, cache=None):
        """The ``AttentionCache`` every cross-decoder layer attends through: ``cache`` with this call's
        K/V written, or, without one, this call's K/V alone (``CallKV``)."""
        B, T, _ = x.shape
        h = self.norm(x)
        k = self.rotary.keys(self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim), step).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        kv = CallKV() if cache is None else cache
        kv.append(k, v)
        return kv

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes the global ``KVCache`` holds per row at ``context`` positions."""
        return kv_bytes_per_position(config, dtype) * context

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float) -> float:
        """Useful FLOPs over a prefill of ``n`` positions: the k and v projections."""
        return 2 * (2 * config.dim * config.n_kv_heads * config.head_dim) * n

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return False


class CrossAttention(nn.Module):
    """A cross-decoder layer's mixer: its own queries (RoPE) and output, the shared global K/V."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, step: Step, kv) -> torch.Tensor:
        """Queries at the step's slots (the positions that need logits) over the global ``kv``."""
        B, T, _ = x.shape
        q = self.rotary.queries(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), step).transpose(1, 2)
        o = kv.attend(q, step)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        return 0  # it reads the global K/V, owned by GlobalKV

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float, *, queries: int | None = None) -> float:
        """Useful FLOPs over a prefill of ``n`` positions of which the last ``queries`` (None: all) go
        through it: q and o projections, and attention over the global keys each may see."""
        H, dh = config.n_heads, config.head_dim
        q = n if queries is None else queries
        pairs = visible_pairs(n) - visible_pairs(n - q)  # the last q queries' keys
        return 2 * (config.dim * H * dh * 2) * q + 4 * H * dh * pairs

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return True  # over a whole prompt; YOCO's prefill runs it for the positions with logits only
