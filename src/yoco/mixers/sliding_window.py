"""Sliding-window attention: each query sees exactly the last W positions, itself included.

Prefill is blocked: queries go in blocks of ``block`` and each block attends only to the keys that
can fall inside its window, so time and memory are O(N * W), never an N x N mask. The cache is a
ring buffer of exactly W positions written at ``slot % W``.
"""

from __future__ import annotations

import torch

from ..cache import CacheError, tensor_bytes
from ..config import ModelConfig
from ..layers import RotaryEmbedding, Step
from .attention import QKVProjection, attend, slot_mask, visible_pairs


class RingKVCache:
    """The last W keys/values, [B, n_kv, W, d], plus the slot each entry holds (-1 while empty)."""

    batch_fields = ("k", "v")

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int, *, dtype: torch.dtype,
                 device=None):
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.full((window,), -1, dtype=torch.long, device=device)
        self.window = window
        self.length = 0  # slots written so far

    def recent(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last n (<= W) keys and values, oldest first."""
        if n > min(self.length, self.window):
            raise CacheError(f"ring buffer holds {min(self.length, self.window)} positions, asked for {n}")
        index = torch.arange(self.length - n, self.length, device=self.k.device) % self.window
        return self.k[:, :, index], self.v[:, :, index]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, n_kv, T, d]; only the last W of them survive."""
        T = k.shape[2]
        keep = min(T, self.window)
        new_slots = torch.arange(self.length + T - keep, self.length + T, device=self.k.device)
        index = new_slots % self.window
        self.k[:, :, index] = k[:, :, T - keep:]
        self.v[:, :, index] = v[:, :, T - keep:]
        self.slots[index] = new_slots
        self.length += T

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)


def blocked_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                             window: int, pad: torch.Tensor | None, block: int) -> torch.Tensor:
    """Sliding-window attention over contiguous slots.

    q [B, H, T, d] holds slots q_start.., k/v [B, n_kv, S, d] hold slots k_start.. and end with the
    queries' own slots. Each block of queries is attended against at most block + W - 1 keys.
    """
    T = q.shape[2]
    out = torch.empty_like(q)
    for i in range(0, T, block):
        j = min(T, i + block)
        first_key = max(k_start, q_start + i - window + 1)
        last_key = q_start + j  # exclusive
        q_slots = torch.arange(q_start + i, q_start + j, device=q.device)
        k_slots = torch.arange(first_key, last_key, device=q.device)
        ks, ke = first_key - k_start, last_key - k_start
        out[:, :, i:j] = attend(q[:, :, i:j], k[:, :, ks:ke], v[:, :, ks:ke],
                                slot_mask(q_slots, k_slots, pad, window))
    return out


class SlidingWindowAttention(QKVProjection):
    """GQA self-attention restricted to a causal window of W positions (itself included)."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, window: int, block: int | None = None):
        super().__init__(config, rotary)
        self.window = window
        # Query block of the blocked prefill. Each block scores block x (block + W - 1) keys of which
        # W per query are useful: smaller blocks waste less (256 with W=1024: 80% useful, 35% faster
        # than blocks of W on a 2-core CPU), but below ~64 rows the matmuls get inefficient.
        self.block = block or max(64, min(window, 256))

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None = None) -> RingKVCache:
        return RingKVCache(batch_size, self.n_kv_heads, self.head_dim, self.window, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, step: Step, cache: RingKVCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, step)
        T = step.length
        if cache is not None and T == 1:
            # Decode: the ring holds exactly the window once the new key is in; order is irrelevant
            # to softmax, so attend over the ring as it lies, masked by the slot each entry holds.
            cache.write(k, v)
            mask = slot_mask(step.slots, cache.slots, step.pad, self.window)
            return self.out(attend(q, cache.k, cache.v, mask))
        k_start = step.start
        if cache is not None:
            previous = min(cache.length, self.window - 1)
            if previous:
                old_k, old_v = cache.recent(previous)
                cache.write(k, v)
                k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
                k_start -= previous
            else:
                cache.write(k, v)
        o = blocked_window_attention(q, k, v, step.start, k_start, self.window, step.pad, self.block)
        return self.out(o)

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes its ``RingKVCache`` holds per row: W positions, whatever the context."""
        return 2 * config.n_kv_heads * config.head_dim * config.window * dtype.itemsize

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float) -> float:
        """Useful FLOPs over a prefill of ``n`` positions: q, k, v, o projections, and attention over
        the at most W keys each query sees."""
        d, H, dh = config.dim, config.n_heads, config.head_dim
        projections = d * H * dh * 2 + d * config.n_kv_heads * dh * 2
        return 2 * projections * n + 4 * H * dh * visible_pairs(n, config.window)

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return False  # O(n * W)
