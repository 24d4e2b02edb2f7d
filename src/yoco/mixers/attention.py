"""Causal (grouped-query) softmax attention and the masking rules every attention mixer shares.

All attention goes through ``attend`` (scaled_dot_product_attention with GQA), and every mask is
built by ``slot_mask`` from slot numbers, so full, windowed, cached, padded and cross attention
obey one rule: a query at slot q sees key slot s iff ``s <= q``, ``q - s < window`` (if windowed),
and ``s`` is a real token of its row (a pad query sees only itself, so it stays finite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..compress.store import CompressedKV, new_store, rotate_by
from ..config import ModelConfig
from ..layers import RotaryEmbedding, Step


def slot_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, pad: torch.Tensor | None,
              window: int | None = None) -> torch.Tensor | None:
    """Boolean attention mask [B or 1, 1, Tq, S] (True = may attend), or None if nothing is masked.

    ``k_slots`` may hold -1 for empty cache entries (a ring buffer not yet full).
    """
    rel = q_slots[:, None] - k_slots[None, :]
    allowed = (rel >= 0) & (k_slots[None, :] >= 0)
    if window is not None:
        allowed &= rel < window
    if pad is not None:
        real_key = k_slots[None, :] >= pad[:, None]  # [B, S]
        allowed = allowed[None] & (real_key[:, None, :] | (rel == 0)[None])
        if bool(pad.max() == 0) and bool(allowed.all()):
            return None
        return allowed[:, None]
    if bool(allowed.all()):
        return None
    return allowed[None, None]


def visible_pairs(n: float, window: int | None = None) -> float:
    """(query, key) pairs a causal attention over n positions computes, each query seeing at most
    ``window`` keys (itself included): its useful work, masked-out pairs not counted."""
    if window is None or window >= n:
        return n * (n + 1) / 2
    return window * (window + 1) / 2 + (n - window) * window


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:
    """Softmax attention; q [B, H, T, d], k/v [B, n_kv, S, d] with n_kv dividing H."""
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    if T == 1 and H != n_kv:
        # Decode: fold each group's query heads into the query length so every K/V head is read once
        # for its whole group (about 2x faster than enable_gqa on CPU); a [B, 1, 1, S] mask broadcasts.
        o = F.scaled_dot_product_attention(q.reshape(B, n_kv, H // n_kv, d), k, v, attn_mask=mask)
        return o.reshape(B, H, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=H != n_kv)


# PyTorch's CPU flash-attention kernel also returns the log-sum-exp, which lets two attentions over
# disjoint key sets be merged exactly. Private API: used only where present, on CPU.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a chunk of T queries whose keys k/v [B, n_kv, S, d] end with the chunk's own
    (no padding): the S - T earlier keys are fully visible, the last T causal.

    On CPU this runs as two unmasked flash attentions (prefix, and the chunk with is_causal) merged by
    their log-sum-exp, about 15% faster than one attention with an explicit [T, S] mask, which the
    kernel expands to a float mask and reads for every block.
    """
    T, S = q.shape[2], k.shape[2]
    if q.device.type != "cpu" or _FLASH_CPU is None or S == T:
        q_slots = torch.arange(S - T, S, device=q.device)
        return attend(q, k, v, slot_mask(q_slots, torch.arange(S, device=q.device), None), causal=S == T)
    prefix, lse_prefix = _FLASH_CPU(q, k[:, :, : S - T], v[:, :, : S - T], 0.0, False)[:2]
    own, lse_own = _FLASH_CPU(q, k[:, :, S - T:], v[:, :, S - T:], 0.0, True)[:2]
    top = torch.maximum(lse_prefix, lse_own)
    w_prefix, w_own = (lse_prefix - top).exp()[..., None], (lse_own - top).exp()[..., None]
    return ((prefix.float() * w_prefix + own.float() * w_own) / (w_prefix + w_own)).to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
    """Queries at the step's slots against keys at slots 0..S-1 (a cache's, or this call's own when the
    call starts at slot 0), picking the fastest exact path."""
    if step.pad is None:
        if step.start == 0:
            return attend(q, k, v, causal=True)
        if step.length > 1:
            return chunk_attention(q, k, v)
    return attend(q, k, v, slot_mask(step.slots, torch.arange(k.shape[2], device=q.device), step.pad))


class QKVProjection(nn.Module):
    """Query/output projections, and key/value projections for a layer that produces its own K/V;
    RoPE on q and k. Shared by the self-attention mixers."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, produces_kv: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        if produces_kv:
            self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = rotary

    def queries(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """q [B, H, T, d], RoPE applied at the step's positions."""
        B, T, _ = x.shape
        cos, sin = step.rope(self.rotary)
        return self.rotary.apply(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v [B, n_kv, T, d], RoPE on k at the step's positions."""
        B, T, _ = x.shape
        cos, sin = step.rope(self.rotary)
        k = self.rotary.apply(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
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

    def new_compressed_cache(self, policy, batch_size: int, **kwargs) -> CompressedKV:
        return compressed_kv_cache(self, policy, batch_size, **kwargs)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache | CompressedKV | None = None,
                shared: dict | None = None) -> torch.Tensor:
        q = self.queries(x, step)
        if self.produces_kv:
            k, v = self.keys_values(x, step)
            if isinstance(cache, CompressedKV):
                cache.append(k, v)
                if shared is not None:
                    shared[self.layer] = cache
                return self.out(cache.attend(q, step))
            if cache is not None:
                k, v = cache.append(k, v)
            if shared is not None:
                shared[self.layer] = (k, v)
        else:
            if shared is None or self.kv_source not in shared:
                raise RuntimeError(f"layer {self.layer} reads the K/V of layer {self.kv_source}, "
                                   "which has not produced them in this forward call")
            if isinstance(shared[self.kv_source], CompressedKV):
                return self.out(shared[self.kv_source].attend(q, step))
            k, v = shared[self.kv_source]
        return self.out(causal_attention(q, k, v, step))

    # ------------------------------------------------------------------ facts from a config
    # A layer reading another's K/V (CLA, MLKV) has no K/V projections and owns no cache: ``produces_kv``.
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype, *, produces_kv: bool = True) -> int:
        """Bytes its ``KVCache`` holds per row at ``context`` positions."""
        return 2 * config.n_kv_heads * config.head_dim * dtype.itemsize * context if produces_kv else 0

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float, *, produces_kv: bool = True) -> float:
        """Useful FLOPs over a prefill of ``n`` positions: q, o (and k, v) projections, and QK^T and AV
        over the keys each query may see (2 FLOPs per multiply-add)."""
        d, H, dh = config.dim, config.n_heads, config.head_dim
        projections = d * H * dh * 2 + (d * config.n_kv_heads * dh * 2 if produces_kv else 0)
        return 2 * projections * n + 4 * H * dh * visible_pairs(n)

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return True  # every position attends to every earlier one


def compressed_kv_cache(mixer: nn.Module, policy, batch_size: int, *, layer: int, n_layers: int, dtype: torch.dtype,
                        device, pad: torch.Tensor | None) -> CompressedKV:
    """A ``CompressedKV`` for a mixer caching RoPE'd keys and values of ``n_kv_heads`` x ``head_dim``."""
    return new_store(policy, layer=layer, n_layers=n_layers, batch_size=batch_size, n_kv_heads=mixer.n_kv_heads,
                     key_dim=mixer.head_dim, value_dim=mixer.head_dim, dtype=dtype, device=device, pad=pad,
                     rotate=lambda keys, delta: rotate_by(mixer.rotary, keys, delta))
