"""``CompressedKV``: an attention cache whose entries a policy evicts, with real memory savings.

Each row and K/V head holds S entries ``k/v [B, h, S, d]`` and the slot of the token in each
(``slots [B, h, S]``, -1 = empty). Keys are cached already RoPE-rotated at their true positions, so
evicting entries never moves anyone's position; masks come from the slots (a query at slot q sees an
entry of slot s iff ``0 <= s <= q``, the entry is a real token of its row, and, with a sliding window,
``q - s < window``), so entries may sit in any order and differ per row and head.

Life of a cache: during the prompt it grows like a plain KV cache (in slot order, attended through the
fast causal path); ``compress()`` then keeps, per row and head, the policy's highest-priority entries
and copies them into new tensors of exactly that size (the old ones are freed); while decoding, a
policy that keeps its budget evicts one entry before each new token is written into the freed place,
so the tensors never grow; other policies grow the tensors by a quarter when full.

A sliding-window layer's cache (``window``, given at construction) never keeps an entry no future
query can see, i.e. one older than the last ``window - 1`` slots: during the prompt the oldest
entries are cut off after every call (``forget_unseeable``), so between calls it holds at most
``window - 1`` entries, as transformers' own ``DynamicSlidingWindowLayer`` does; ``compress()`` keeps
at most ``min(budget, window - 1)``; while decoding, the entries that fell out of the window are
freed and reused before the tensors grow, and they grow to at most ``window`` entries. That is one
entry more than transformers' sliding layer holds between decode steps: the store writes the current
token in place, where it is attended, while transformers concatenates it to its ``window - 1`` for
the call only. So a windowed store holds at most what transformers' cache does, plus one token
while decoding (a call of T > 1 tokens after compression needs, and keeps, ``window - 1 + T``).

The same class serves yoco's caches (Transformer family, YOCO's single global K/V, MLA's latent,
whose keys and values are one tensor) and the transformers integration (``compress/hf.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import tensor_bytes
from ..layers import RotaryEmbedding, Step
from .policies import CORM, BudgetError, Policy, StreamingLLM

# Queries scored per block when a policy observes every query (bounds the [T, S] score memory).
OBSERVE_BLOCK = 256


def entry_mask(q_slots: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor | None,
               window: int | None = None) -> torch.Tensor:
    """[B, h, T, S] True where the query at ``q_slots[t]`` may attend entry ``slots[b, h, s]``."""
    rel = q_slots[None, None, :, None] - slots[:, :, None, :]
    allowed = (slots >= 0)[:, :, None] & (rel >= 0)
    if window is not None:
        allowed &= rel < window
    if pad is not None:
        real = slots >= pad[:, None, None]
        allowed &= real[:, :, None] | (rel == 0)  # a pad query sees only itself
    return allowed


def rotate_by(rotary: RotaryEmbedding, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys or queries x [B, h, n, d] RoPE-rotated further by ``delta`` positions (negative moves them
    back): one per row ``[B]``, or one per row and token ``[B, n]``."""
    cos, sin = rotary.tables(delta[:, None] if delta.dim() == 1 else delta)  # [B, 1 or n, 1, d/2]
    return rotary.apply(x.transpose(1, 2), cos, sin).transpose(1, 2)


def new_store(policy: Policy, **kwargs) -> CompressedKV:
    """The cache kind ``policy`` acts on: InfLLM's context memory, or a ``CompressedKV``."""
    from .infllm import InfLLMKV  # (it builds on this module)
    from .policies import InfLLM

    return (InfLLMKV if isinstance(policy, InfLLM) else CompressedKV)(policy, **kwargs)


class CompressedKV:
    """One attention cache under a compression ``policy`` (see the module docstring).

    ``layer``/``n_layers``: this cache's index among the model's compressed caches (PyramidKV's depth).
    ``rotate(x, delta)``: re-rotates keys by per-row position deltas (StreamingLLM moves its sinks).
    ``values_are_keys``: MLA attends with the cached rows as both keys and values (``v`` is not stored).
    ``window``: the layer's sliding window (a query at slot q sees slots > q - window), None for full
    attention; the store then drops what falls out of it (see the module docstring).
    """

    kind = "compressed KV cache"

    def __init__(self, policy: Policy, *, layer: int, n_layers: int, batch_size: int, n_kv_heads: int,
                 key_dim: int, value_dim: int, dtype: torch.dtype, device=None, pad: torch.Tensor | None = None,
                 rotate=None, values_are_keys: bool = False, window: int | None = None):
        if policy.needs_rotary and rotate is None:
            raise BudgetError(f"{type(policy).__name__} re-rotates cached keys and needs the model's RoPE for it")
        if window is not None and window < 1:
            raise BudgetError(f"a sliding window must be >= 1 token, got {window}")
        self.policy, self.layer, self.n_layers, self.rotate = policy, layer, n_layers, rotate
        self.window = window
        B, h = batch_size, n_kv_heads
        self.k = torch.zeros(B, h, 0, key_dim, dtype=dtype, device=device)
        self.v = None if values_are_keys else torch.zeros(B, h, 0, value_dim, dtype=dtype, device=device)
        self.slots = torch.zeros(B, h, 0, dtype=torch.long, device=device)
        self.score = torch.zeros(B, h, 0, device=device) if policy.observe else None
        self.last_attended = torch.zeros(B, h, 0, dtype=torch.long, device=device) if isinstance(policy, CORM) else None
        self.pad = pad
        self.limit: torch.Tensor | None = None  # [B] entries per row, set by compress()
        self.sink_keys: torch.Tensor | None = None  # StreamingLLM's sinks at their true positions
        self.sink_moved: torch.Tensor | None = None  # [B] whether sink_keys holds the row's sinks yet
        self.seen = 0
        self.compressed = False
        self.observed_call = -1  # start slot of the call whose tail queries ``score`` holds

    @property
    def batch_fields(self) -> tuple[str, ...]:
        names = ("k", "v", "slots", "score", "last_attended", "pad", "limit", "sink_keys", "sink_moved")
        return tuple(n for n in names if getattr(self, n) is not None)

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (what the budget shrinks)."""
        return tensor_bytes(self.k) + (tensor_bytes(self.v) if self.v is not None else 0)

    def index_bytes(self) -> int:
        """Bookkeeping beside the K/V: slots, scores, StreamingLLM's sink copies."""
        extra = [t for t in (self.slots, self.score, self.last_attended, self.sink_keys) if t is not None]
        return tensor_bytes(*extra)

    @property
    def entries(self) -> int:
        return self.k.shape[2]

    def live(self) -> torch.Tensor:
        """[B, h] tokens held per row and head."""
        return self.valid().sum(-1)

    def valid(self) -> torch.Tensor:
        valid = self.slots >= 0
        if self.pad is not None:
            valid &= self.slots >= self.pad[:, None, None]
        return valid

    # ------------------------------------------------------------------ writing
    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Write the keys/values [B, h, T, d] of the next T slots (evicting first once compressed)."""
        T = k.shape[2]
        if not self.compressed:
            B, h = self.k.shape[:2]
            new_slots = torch.arange(self.seen, self.seen + T, device=k.device).expand(B, h, T)
            self.k = torch.cat((self.k, k), dim=2)
            if self.v is not None:
                self.v = torch.cat((self.v, v), dim=2)
            self.slots = torch.cat((self.slots, new_slots), dim=2)
            if self.score is not None:
                self.score = torch.cat((self.score, self.score.new_zeros(B, h, T)), dim=2)
            if self.last_attended is not None:
                self.last_attended = torch.cat((self.last_attended, new_slots), dim=2)
            self.seen += T
            return
        self.forget_unseeable()  # before any eviction: what left the window makes room first
        for t in range(T):
            self._write_one(k[:, :, t], None if v is None else v[:, :, t])

    def _write_one(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        slot, policy = self.seen, self.policy
        if isinstance(policy, CORM):
            self.slots.masked_fill_(policy.evicted(self.slots, slot - 1, self.last_attended), -1)
        if policy.keeps_budget_while_decoding and policy.budget is not None:
            full = self.live() >= self.limit[:, None]
            if bool(full.any()):
                self._evict_one(full, slot - 1)
        free = self.slots < 0
        if not bool(free.any(-1).all()):
            self._grow()
            free = self.slots < 0
        index = free.to(torch.int8).argmax(-1, keepdim=True)  # the first free entry of each row and head
        self._put(index, k, v, slot)
        self.seen += 1
        if isinstance(policy, StreamingLLM):
            self._move_sinks()

    def _put(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, slot: int) -> None:
        d = self.k.shape[-1]
        self.k.scatter_(2, index[..., None].expand(*index.shape, d), k[:, :, None])
        if self.v is not None:
            self.v.scatter_(2, index[..., None].expand(*index.shape, self.v.shape[-1]), v[:, :, None])
        self.slots.scatter_(2, index, slot)
        if self.score is not None:
            self.score.scatter_(2, index, 0.0)
        if self.last_attended is not None:
            self.last_attended.scatter_(2, index, slot)

    def _evict_one(self, rows: torch.Tensor, newest: int) -> None:
        """Empty the lowest-priority entry of every (row, head) where ``rows`` [B, h] is True."""
        priority = self.priority(newest).masked_fill(~self.valid(), float("inf"))
        victim = priority.argmin(-1, keepdim=True)
        current = self.slots.gather(2, victim)
        self.slots.scatter_(2, victim, torch.where(rows[..., None], -1, current))

    def _grow(self) -> None:
        # By a quarter (appends stay amortised O(1)), but never beyond what the uncompressed cache holds
        # once this token is written (seen + 1), nor, with a window, beyond it: a single-token call needs
        # at most `window` entries (its own and the window - 1 before it); only a longer call after
        # compression grows beyond, one entry at a time.
        most = self.seen + 1 if self.window is None else min(self.seen + 1, self.window)
        extra = max(1, min(max(16, self.entries // 4), most - self.entries))
        B, h, S = self.slots.shape

        def widen(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat((t, t.new_full((B, h, extra, *t.shape[3:]), fill)), dim=2)

        self.k = widen(self.k, 0)
        if self.v is not None:
            self.v = widen(self.v, 0)
        self.slots = widen(self.slots, -1)
        if self.score is not None:
            self.score = widen(self.score, 0)
        if self.last_attended is not None:
            self.last_attended = widen(self.last_attended, -1)

    def forget_unseeable(self) -> None:
        """Drop the entries no query from slot ``seen`` on can see (with a window: those older than the
        last ``window - 1`` slots). Before compression the entries are in slot order, so the oldest are
        cut off and the rest copied into new tensors (the old ones are freed); after it they are marked
        free for reuse. Call it only once every reader of the current call has attended."""
        if self.window is None:
            return
        if self.compressed:
            self.slots.masked_fill_(self.slots <= self.seen - self.window, -1)
            return
        cut = self.entries - min(self.entries, self.window - 1)
        if cut == 0:
            return
        for name in ("k", "v", "slots", "score", "last_attended"):
            kept = getattr(self, name)
            if kept is not None:
                setattr(self, name, kept[:, :, cut:].clone())  # clone: a view would keep the whole prompt

    # ------------------------------------------------------------------ compression
    def priority(self, newest: int) -> torch.Tensor:
        return self.policy.priority(self.slots, newest, self.score, self.limit, self.pad)

    def prompt_tokens(self) -> torch.Tensor:
        tokens = torch.full((self.k.shape[0],), self.seen, dtype=torch.long, device=self.k.device)
        return tokens if self.pad is None else tokens - self.pad

    def compress(self) -> None:
        """Keep the policy's choice of the prompt's entries, in new tensors of exactly that size."""
        if self.compressed:
            raise BudgetError("this cache is already compressed (compress once, after the prompt)")
        self.forget_unseeable()
        policy, newest = self.policy, self.seen - 1
        prompt = self.prompt_tokens()
        self.limit = policy.limit(prompt, self.layer, self.n_layers)
        policy.check_limit(self.limit)
        if isinstance(policy, CORM):
            self.slots.masked_fill_(policy.evicted(self.slots, newest, self.last_attended), -1)
        valid = self.valid()
        keep = torch.minimum(self.limit, prompt)[:, None, None]
        priority = self.priority(newest).masked_fill(~valid, float("-inf"))
        n = max(int(torch.minimum(keep[:, 0, 0], valid.sum(-1).amax(-1)).max()), 1)
        top, index = priority.topk(n, dim=-1)
        dropped = (torch.arange(n, device=index.device) >= keep) | (top == float("-inf"))
        # entries in slot order, empties last: StreamingLLM's sinks then sit in entries 0..n_sink-1
        slots = self.slots.gather(2, index).masked_fill(dropped, -1)
        order = torch.where(slots < 0, torch.iinfo(torch.long).max, slots).argsort(-1)
        index, slots = index.gather(2, order), slots.gather(2, order)
        self.k = self.k.gather(2, index[..., None].expand(*index.shape, self.k.shape[-1]))
        if self.v is not None:
            self.v = self.v.gather(2, index[..., None].expand(*index.shape, self.v.shape[-1]))
        if self.score is not None:
            self.score = self.score.gather(2, index)
        if self.last_attended is not None:
            self.last_attended = self.last_attended.gather(2, index)
        self.slots = slots
        self.compressed = True
        if isinstance(policy, StreamingLLM):
            self._move_sinks()

    def _move_sinks(self) -> None:
        """StreamingLLM gives the kept tokens contiguous positions: sinks, then the recent window. With
        keys cached at their true positions the same relative geometry is had by moving only the sinks
        to sit just before the oldest recent token (RoPE scores depend on position differences only),
        so queries keep their true positions. Sinks are re-rotated from an unrotated copy each time,
        never step by step (no rounding drift in bf16)."""
        n = self.policy.n_sink
        if n == 0 or not self.policy.reposition_sinks:
            return
        first = self.prompt_tokens().new_zeros(self.k.shape[0]) if self.pad is None else self.pad
        slots = self.slots[:, 0]  # position-based: every head holds the same tokens
        is_sink = (slots >= 0) & (slots - first[:, None] < n)
        rest = torch.where((slots >= 0) & ~is_sink, slots, torch.iinfo(torch.long).max).min(-1).values
        delta = (rest - first - n).clamp_min(0)
        delta = torch.where(rest == torch.iinfo(torch.long).max, 0, delta)
        # a sliding window frees the sinks once they leave it, and their entries are reused
        held = is_sink[:, :n]
        moving = (delta > 0) & held.any(-1)
        if not bool(moving.any()):
            return
        if self.sink_keys is None:
            self.sink_keys = self.k[:, :, :n].clone()
            self.sink_moved = torch.zeros_like(moving)
        fresh = moving & ~self.sink_moved
        if bool(fresh.any()):
            self.sink_keys[fresh] = self.k[fresh, :, :n]
            self.sink_moved |= fresh
        moved = self.rotate(self.sink_keys, delta)
        self.k[:, :, :n] = torch.where((moving[:, None] & held)[:, None, :, None], moved, self.k[:, :, :n])

    # ------------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, step: Step, scale: float | None = None) -> torch.Tensor:
        """Queries q [B, H, T, d] at the step's slots against every entry; [B, H, T, d_v]. Also lets the
        policy observe these queries' attention (every layer reading this cache adds to it)."""
        B, H, T, d = q.shape
        values = self.k if self.v is None else self.v
        if self.policy.observe and (not self.compressed or self.policy.keeps_budget_while_decoding):
            self._observe(q, step.slots, scale)
        if scale is not None:  # fold a custom softmax scale into the queries (SDPA's default is d^-0.5)
            q = q * (scale * d ** 0.5)
        if not self.compressed and self.window is None:
            from ..mixers.attention import causal_attention  # (the mixers import this module)

            return causal_attention(q, self.k, values, step)  # entries still in slot order: fast path
        h = self.k.shape[1]
        G = H // h
        mask = entry_mask(step.slots, self.slots, self.pad, self.window)
        # one K/V head per query group: fold the group's heads into the query length
        mask = mask[:, :, None].expand(B, h, G, T, mask.shape[-1]).reshape(B, h, G * T, -1)
        o = F.scaled_dot_product_attention(q.reshape(B, h, G * T, d), self.k, values, attn_mask=mask)
        return o.reshape(B, H, T, values.shape[-1])

    def probabilities(self, q: torch.Tensor, q_slots: torch.Tensor,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention weights [B, h, G, T, S] (fp32) of queries q [B, H, T, d], and the mask
        [B, h, 1, T, S] they were computed under."""
        B, H, T, d = q.shape
        h = self.k.shape[1]
        scale = d ** -0.5 if scale is None else scale
        logits = torch.einsum("bhgtd,bhsd->bhgts", q.reshape(B, h, H // h, T, d).float(), self.k.float()) * scale
        mask = entry_mask(q_slots, self.slots, self.pad, self.window)[:, :, None]
        return logits.masked_fill(~mask, float("-inf")).softmax(-1), mask

    def _observe(self, q: torch.Tensor, q_slots: torch.Tensor, scale) -> None:
        policy = self.policy
        start = int(q_slots[0])
        if policy.observe == "tail":
            if start != self.observed_call and not self.compressed:
                self.score.zero_()  # a new call: only the prompt's last queries count
            self.observed_call = start
            tail = min(policy.window, q.shape[2])
            q, q_slots = q[:, :, -tail:], q_slots[-tail:]
        for lo in range(0, q.shape[2], OBSERVE_BLOCK):
            block, block_slots = q[:, :, lo:lo + OBSERVE_BLOCK], q_slots[lo:lo + OBSERVE_BLOCK]
            p, mask = self.probabilities(block, block_slots, scale)
            self.score += p.sum(dim=(2, 3))
            if self.last_attended is not None:
                # CORM: attended = at least the uniform share 1/t of a query that saw t tokens,
                # by any query head of the K/V head's group
                uniform = 1.0 / mask.sum(-1, keepdim=True).clamp_min(1)
                attended = (p >= uniform).any(2)  # [B, h, T, S]
                latest = torch.where(attended, block_slots[None, None, :, None], -1).amax(2)
                self.last_attended = torch.maximum(self.last_attended, latest)
