"""YOCO's global K/V and the cross-attention that every cross-decoder layer runs against it."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from ..layers import RMSNorm, RotaryEmbedding, Step
from ..compress.store import CompressedKV
from .attention import attend, compressed_kv_cache, slot_mask, visible_pairs


class GlobalKV(nn.Module):
    """Builds the one K/V cache of a YOCO model from the self-decoder output.

    ``K = RoPE(k_proj(RMSNorm(h)))``, ``V = v_proj(RMSNorm(h))`` with n_kv heads; cached once and read
    by every cross-decoder layer.
    """

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.rotary = rotary

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, dtype=dtype, device=device, capacity=capacity)

    def new_compressed_cache(self, policy, batch_size: int, **kwargs) -> CompressedKV:
        return compressed_kv_cache(self, policy, batch_size, **kwargs)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache | CompressedKV | None = None):
        """K, V [B, n_kv, S, d] for every slot so far (the cache's, or this call's without one); with a
        compressed cache, the cache itself (every cross-decoder layer attends through it)."""
        B, T, _ = x.shape
        h = self.norm(x)
        cos, sin = step.rope(self.rotary)
        k = self.rotary.apply(self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(cache, CompressedKV):
            cache.append(k, v)
            return cache
        if cache is not None:
            return cache.append(k, v)
        return k, v

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes the global ``KVCache`` holds per row at ``context`` positions."""
        return 2 * config.n_kv_heads * config.head_dim * dtype.itemsize * context

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
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, step: Step, k: torch.Tensor | CompressedKV, v: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = step.rope(self.rotary)
        q = self.rotary.apply(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        o = k.attend(q, step) if isinstance(k, CompressedKV) else attend(q, k, v, mask, causal=causal)
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


def cross_mask(step: Step, n_keys: int, device) -> tuple[torch.Tensor | None, bool]:
    """Mask for queries at the step's slots against global keys at slots 0..n_keys-1.

    Returns (mask, causal): the square unpadded case uses SDPA's causal path with no mask at all.
    """
    if step.pad is None and step.start == 0 and step.length == n_keys:
        return None, True
    return slot_mask(step.slots, torch.arange(n_keys, device=device), step.pad), False
