"""Sliding-window attention: each query sees exactly the last W positions, itself included.

Prefill is blocked: queries go in blocks of ``block`` and each block attends only to the keys that
can fall inside its window, so time and memory are O(N * W), never an N x N mask. The cache is a
ring buffer of exactly W positions written at ``slot % W``.
"""

from __future__ import annotations

import functools

import torch

from ..cache import CacheError, tensor_bytes
from ..config import ModelConfig
from ..kernels import attend, native_window_attention, slot_mask
from ..layers import RotaryEmbedding, Step
from .attention import CausalSelfAttention, QKVProjection, kv_bytes_per_position


def default_block(window: int) -> int:
    # Query block of the blocked prefill. Each block scores block x (block + W - 1) keys of which
    # W per query are useful: smaller blocks waste less (256 with W=1024: 80% useful, 35% faster
    # than blocks of W on a 2-core CPU), but below ~64 rows the matmuls get inefficient.
    return max(64, min(window, 256))


def refuse_scale_or_expand(scale: float | None, expand) -> None:
    if scale is not None or expand is not None:
        raise CacheError("sliding-window attention takes plain queries (no scale, no expand)")


class WindowCallKV:
    """One call's keys/values under a sliding window (the ``AttentionCache`` without a cache): its
    queries attend blocked, each block only the keys its window can reach. ``earlier``: how many keys
    precede the call's first slot (those a ring lends from the window before the call)."""

    def __init__(self, window: int, block: int | None = None):
        self.window, self.block = window, block or default_block(window)
        self.k = self.v = None
        self.earlier = 0  # keys before the call's first slot

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None, expand=None) -> torch.Tensor:
        refuse_scale_or_expand(scale, expand)
        return blocked_window_attention(q, self.k, self.v, step.start, step.start - self.earlier, self.window,
                                        step.pad, self.block)

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v) if self.k is not None else 0


class RingKVCache:
    """The last W keys/values, [B, n_kv, W, d], plus the slot each entry holds (-1 while empty).

    As an ``AttentionCache``: a single-token call attends over the ring as it lies (order is irrelevant
    to softmax; the mask comes from the slot each entry holds); a longer call attends blocked over the
    window's earlier keys and its own, held for that call only."""

    batch_fields = ("k", "v")

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int, *, dtype: torch.dtype,
                 device=None, block: int | None = None):
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.full((window,), -1, dtype=torch.long, device=device)
        self.window = window
        self.length = 0  # slots written so far
        self.block = block or default_block(window)
        self.call: WindowCallKV | None = None  # a multi-token call's keys, until it has attended

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this call's k, v [B, n_kv, T, d]; a longer call also keeps, until it attends, the
        window's earlier keys with its own."""
        if k.shape[2] == 1:
            self.call = None
            self.write(k, v)
            return
        self.call = WindowCallKV(self.window, self.block)
        previous = min(self.length, self.window - 1)
        if previous:
            old_k, old_v = self.recent(previous)
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.write(k[:, :, previous:], v[:, :, previous:])
        self.call.append(k, v)
        self.call.earlier = previous

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None, expand=None) -> torch.Tensor:
        if self.call is not None:
            call, self.call = self.call, None  # held for this call only
            return call.attend(q, step, scale=scale, expand=expand)
        refuse_scale_or_expand(scale, expand)
        # Nothing is masked once the ring is full (it holds exactly the query's window) and no row is
        # padded: known from ints, so the step reads no tensor value (no host synchronisation). A step
        # torch.compile captures masks always (all visible once full), so that the ring filling up
        # does not recompile it.
        mask = None
        if torch.compiler.is_compiling() or self.length < self.window or step.pad is not None:
            mask = slot_mask(step.slots, self.slots, step.pad, self.window, none_if_unmasked=False)
        return attend(q, self.k, self.v, mask)

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
    queries' own slots. Each block of queries is attended against at most block + W - 1 keys, in one
    attention whose mask is the window's band (``window_band``).
    """
    T = q.shape[2]
    if pad is None and T > 1 and k.shape[2] == q_start - k_start + T:
        fused = native_window_attention(q, k, v, q_start - k_start, window)
        if fused is not None:
            return fused
    out = torch.empty_like(q)
    for i in range(0, T, block):
        j = min(T, i + block)
        first_key = max(k_start, q_start + i - window + 1)
        last_key = q_start + j  # exclusive
        ks, ke = first_key - k_start, last_key - k_start
        qb, kb, vb = q[:, :, i:j], k[:, :, ks:ke], v[:, :, ks:ke]
        earlier = q_start + i - first_key  # keys before the block's first query
        if pad is not None:
            q_slots = torch.arange(q_start + i, q_start + j, device=q.device)
            k_slots = torch.arange(first_key, last_key, device=q.device)
            out[:, :, i:j] = attend(qb, kb, vb, slot_mask(q_slots, k_slots, pad, window, none_if_unmasked=False))
        elif j - i == 1 or (earlier == 0 and j - i <= window):  # one query sees all its keys; or plain causal
            out[:, :, i:j] = attend(qb, kb, vb, causal=j - i > 1)
        else:
            out[:, :, i:j] = attend(qb, kb, vb, window_band(j - i, earlier, window, q.dtype, q.device))
    return out


@functools.lru_cache(maxsize=8)
def window_band(n: int, earlier: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask [n, earlier + n] of n queries after ``earlier`` keys: query r sees keys
    earlier + r - W < c <= earlier + r (0), not the others (-inf). Every full block of a prefill has the
    same one, so it is built once and shared (never written to). One attention under this float mask
    was the fastest way found on CPU (a 4096-token chunk's blocks of 256, W = 1024: 92-95 ms against
    107-112 ms with the same mask as booleans, which SDPA converts at each call, and 109-137 ms for three
    unmasked flash attentions per block, merged by their log-sum-exp)."""
    with torch.inference_mode(False):  # kept for later calls, which may be tracked by autograd
        r = torch.arange(n, device=device)[:, None] + earlier
        c = torch.arange(earlier + n, device=device)[None, :]
        seen = (c <= r) & (c > r - window)
        return torch.zeros(n, earlier + n, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


class SlidingWindowAttention(QKVProjection):
    """GQA self-attention restricted to a causal window of W positions (itself included)."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, window: int, block: int | None = None):
        super().__init__(config, rotary)
        self.window = window
        self.block = block or default_block(window)

    @classmethod
    def for_self_decoder(cls, config: ModelConfig, plain_rope) -> "SlidingWindowAttention":
        """A YOCO self-decoder layer: the config's window, plain RoPE of the attention heads."""
        return cls(config, plain_rope(config.head_dim), config.window)

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None = None) -> RingKVCache:
        return RingKVCache(batch_size, self.n_kv_heads, self.head_dim, self.window, dtype=dtype, device=device,
                           block=self.block)

    def forward(self, x: torch.Tensor, step: Step, cache: RingKVCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, step)
        kv = WindowCallKV(self.window, self.block) if cache is None else cache
        kv.append(k, v)
        return self.out(kv.attend(q, step))

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes its ``RingKVCache`` holds per row: W positions, whatever the context."""
        return kv_bytes_per_position(config, dtype) * config.window

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float) -> float:
        """Full attention's, each query seeing at most W keys."""
        return CausalSelfAttention.prefill_flops(config, n, window=config.window)

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return False  # O(n * W)
