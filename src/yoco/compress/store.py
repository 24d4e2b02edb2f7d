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

A sliding-window layer's cache (``sliding_window``, given at construction) never keeps an entry no future
query can see, i.e. one older than the last ``window - 1`` slots: during the prompt the oldest
entries are cut off after every call (``forget_unseeable``), so between calls it holds at most
``window - 1`` entries, as transformers' own ``DynamicSlidingWindowLayer`` does; ``compress()`` keeps
at most ``min(budget, window - 1)``; while decoding, the entries that fell out of the window are
freed and reused before the tensors grow, and they grow to at most ``window`` entries. That is one
entry more than transformers' sliding layer holds between decode steps: the store writes the current
token in place, where it is attended, while transformers concatenates it to its ``window - 1`` for
the call only. So a windowed store holds at most what transformers' cache does, plus one token
while decoding (a call of T > 1 tokens after compression needs, and keeps, ``window - 1 + T``).

What is policy-specific happens in hooks the store calls on its policy (``Policy``, ``policies.py``):
the per-entry state it keeps (``entry_state``), the queries it observes (``observes`` / ``observed``),
what happens before a decode write (``before_write``: budget eviction, CORM's rule) and after every
update (``after_update``: StreamingLLM moves its sinks), and each K/V head's share of the budget
(``head_limits``). The store never asks which policy it holds.

The same class serves yoco's caches (Transformer family, YOCO's single global K/V, MLA's latent,
whose keys and values are one tensor) and the transformers integration (``compress/hf.py``).

Unlike the plain caches' decode steps, a store's step reads tensor values into Python (whether a row
is full, which entries to free, the policy's own checks): host synchronisations, which the engine's
``compile`` therefore does not try to capture (it refuses a compressed cache).
"""

from __future__ import annotations

import copy

import torch

from ..cache import Expand, KVGeometry, tensor_bytes
from ..kernels import causal_attention, grouped_attention, slot_mask
from ..layers import Step
from ..quantize import QuantizedKV
from .errors import BudgetError

# Queries scored per block when a policy observes every query (bounds the [T, S] score memory).
OBSERVE_BLOCK = 256


class CompressedKV:
    """One attention cache under a compression ``policy`` (see the module docstring); an
    ``AttentionCache`` (``yoco.cache``) like every other.

    ``layer``/``n_layers``: this cache's index among the model's compressed caches (PyramidKV's depth).
    ``rotate(x, delta)``: re-rotates keys by per-row position deltas (StreamingLLM moves its sinks).
    ``values_are_keys``: MLA attends with the cached rows as both keys and values (``v`` is not stored).
    ``sliding_window``: the layer's sliding window (a query at slot q sees slots > q - window), None for
    full attention; the store then drops what falls out of it (see the module docstring).

    Per-entry tensors [B, h, S] beside k/v/slots: the policy's ``entry_state()`` (e.g. ``score``, the
    attention observed; CORM's ``last_attended``), attributes of those names. Per-row tensors a policy
    keeps in the store (StreamingLLM's sinks) go in ``row_state`` (moved with the rows like the rest).
    """

    kind = "compressed KV cache"

    def __init__(self, policy, *, layer: int, n_layers: int, batch_size: int, n_kv_heads: int,
                 key_dim: int, value_dim: int, dtype: torch.dtype, device=None, pad: torch.Tensor | None = None,
                 rotate=None, values_are_keys: bool = False, sliding_window: int | None = None, quantization=None):
        if policy.needs_rotary and rotate is None:
            raise BudgetError(f"{type(policy).__name__} re-rotates cached keys and needs the model's RoPE for it")
        if sliding_window is not None and sliding_window < 1:
            raise BudgetError(f"a sliding window must be >= 1 token, got {sliding_window}")
        self.policy, self.layer, self.n_layers, self.rotate = policy, layer, n_layers, rotate
        self.sliding_window = sliding_window
        B, h = batch_size, n_kv_heads
        self.k = torch.zeros(B, h, 0, key_dim, dtype=dtype, device=device)
        self.v = None if values_are_keys else torch.zeros(B, h, 0, value_dim, dtype=dtype, device=device)
        self.slots = torch.zeros(B, h, 0, dtype=torch.long, device=device)
        self.score: torch.Tensor | None = None
        self.entry_state = dict(policy.entry_state())  # name -> dtype
        for name, kind in self.entry_state.items():
            setattr(self, name, torch.zeros(B, h, 0, dtype=kind, device=device))
        self.row_state: dict[str, torch.Tensor] = {}
        self.pad = pad
        self.limit: torch.Tensor | None = None  # [B] entries per row, set by compress()
        self.head_limit: torch.Tensor | None = None  # [B, h] entries per row and K/V head, set by compress()
        self.seen = 0
        self.compressed = False
        self.observed_call = -1  # start slot of the latest call whose queries were observed
        # With a ``yoco.quantize.KVQuantization`` the kept entries are quantized at ``compress()`` and
        # the store's entries live on in that quantized cache (only for policies that keep no budget
        # while decoding: nothing is evicted from it afterwards).
        self.quantization = quantization
        self.quantized = None
        self.geometry = KVGeometry(n_kv_heads, key_dim, value_dim, rotate, values_are_keys, sliding_window)
        if quantization is not None:
            if policy.keeps_budget_while_decoding:
                raise BudgetError(f"{type(policy).__name__} evicts while decoding; only the policies that compress "
                                  f"the prompt once (SnapKV, PyramidKV, AdaKV) quantize what they keep")
            quantization.check(self.geometry)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        names = ("k", "v", "slots", *self.entry_state, "pad", "limit", "head_limit")
        return tuple(n for n in names if getattr(self, n) is not None)

    def with_rows(self, rows) -> "CompressedKV":
        """A copy whose batch tensors (and the policy's per-row state) are ``rows(tensor)``."""
        clone = copy.copy(self)
        for name in self.batch_fields:
            setattr(clone, name, rows(getattr(self, name)))
        clone.row_state = {name: rows(t) for name, t in self.row_state.items()}
        clone.quantized = None if self.quantized is None else self.quantized.with_rows(rows)
        return clone

    def _entry_tensors(self) -> tuple[str, ...]:
        """The tensors holding one value per entry, along dim 2."""
        return tuple(n for n in ("k", "v", "slots", *self.entry_state) if getattr(self, n) is not None)

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (what the budget shrinks), quantized once compressed if
        the store quantizes."""
        quantized = 0 if self.quantized is None else self.quantized.nbytes()
        return tensor_bytes(self.k) + (tensor_bytes(self.v) if self.v is not None else 0) + quantized

    def index_bytes(self) -> int:
        """Bookkeeping beside the K/V: slots, the policy's per-entry and per-row state."""
        quantized = 0 if self.quantized is None else self.quantized.index_bytes()
        return tensor_bytes(self.slots, *(getattr(self, n) for n in self.entry_state), *self.row_state.values()) \
            + quantized

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
        if self.quantized is not None:
            self.quantized.append(k, v)
            self.seen += T
            return
        if not self.compressed:
            B, h = self.k.shape[:2]
            new_slots = torch.arange(self.seen, self.seen + T, device=k.device).expand(B, h, T)
            self.k = torch.cat((self.k, k), dim=2)
            if self.v is not None:
                self.v = torch.cat((self.v, v), dim=2)
            self.slots = torch.cat((self.slots, new_slots), dim=2)
            for name, kind in self.entry_state.items():
                fresh = new_slots if not kind.is_floating_point else torch.zeros(B, h, T, dtype=kind, device=k.device)
                setattr(self, name, torch.cat((getattr(self, name), fresh), dim=2))
            self.seen += T
            return
        self.forget_unseeable()  # before any eviction: what left the window makes room first
        for t in range(T):
            self._write_one(k[:, :, t], None if v is None else v[:, :, t])

    def _write_one(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        slot = self.seen
        self.policy.before_write(self, slot - 1)
        free = self.slots < 0
        if not bool(free.any(-1).all()):
            self._grow()
            free = self.slots < 0
        index = free.to(torch.int8).argmax(-1, keepdim=True)  # the first free entry of each row and head
        self._put(index, k, v, slot)
        self.seen += 1
        self.policy.after_update(self)

    def _put(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, slot: int) -> None:
        d = self.k.shape[-1]
        self.k.scatter_(2, index[..., None].expand(*index.shape, d), k[:, :, None])
        if self.v is not None:
            self.v.scatter_(2, index[..., None].expand(*index.shape, self.v.shape[-1]), v[:, :, None])
        self.slots.scatter_(2, index, slot)
        for name, kind in self.entry_state.items():  # a new entry starts at its slot (integer) or 0
            getattr(self, name).scatter_(2, index, 0.0 if kind.is_floating_point else slot)

    def evict_over_limit(self, newest: int) -> None:
        """Before a write: empty the lowest-priority entry of every (row, head) at its limit (the
        budget-keeping policies' ``before_write``)."""
        full = self.live() >= self.head_limit
        if bool(full.any()):
            self._evict_one(full, newest)

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
        most = self.seen + 1 if self.sliding_window is None else min(self.seen + 1, self.sliding_window)
        extra = max(1, min(max(16, self.entries // 4), most - self.entries))
        B, h, S = self.slots.shape
        for name in self._entry_tensors():
            t = getattr(self, name)
            fill = 0 if t.is_floating_point() or name == "k" or name == "v" else -1
            setattr(self, name, torch.cat((t, t.new_full((B, h, extra, *t.shape[3:]), fill)), dim=2))

    def forget_unseeable(self) -> None:
        """Drop the entries no query from slot ``seen`` on can see (with a window: those older than the
        last ``window - 1`` slots). Before compression the entries are in slot order, so the oldest are
        cut off and the rest copied into new tensors (the old ones are freed); after it they are marked
        free for reuse. Call it only once every reader of the current call has attended."""
        window = self.sliding_window
        if window is None:
            return
        if self.compressed:
            self.slots.masked_fill_(self.slots <= self.seen - window, -1)
            return
        cut = self.entries - min(self.entries, window - 1)
        if cut == 0:
            return
        for name in self._entry_tensors():
            setattr(self, name, getattr(self, name)[:, :, cut:].clone())  # clone: a view would keep the prompt

    # ------------------------------------------------------------------ compression
    def priority(self, newest: int) -> torch.Tensor:
        return self.policy.priority(self.slots, newest, self.score, self.limit, self.pad)

    def prompt_tokens(self) -> torch.Tensor:
        tokens = torch.full((self.k.shape[0],), self.seen, dtype=torch.long, device=self.k.device)
        return tokens if self.pad is None else tokens - self.pad

    def first_slots(self) -> torch.Tensor:
        """[B] each row's first real slot."""
        return self.pad if self.pad is not None else torch.zeros(self.k.shape[0], dtype=torch.long,
                                                                  device=self.k.device)

    def compress(self) -> None:
        """Keep the policy's choice of the prompt's entries, in new tensors of exactly that size."""
        if self.compressed:
            raise BudgetError("this cache is already compressed (compress once, after the prompt)")
        self.forget_unseeable()
        policy, newest = self.policy, self.seen - 1
        prompt = self.prompt_tokens()
        self.limit = policy.limit(prompt, self.layer, self.n_layers)
        policy.check_limit(self.limit)
        policy.before_compress(self, newest)
        self.head_limit = policy.head_limits(self, self.limit)
        valid = self.valid()
        keep = torch.minimum(self.head_limit, prompt[:, None])[..., None]  # [B, h, 1]
        priority = self.priority(newest).masked_fill(~valid, float("-inf"))
        n = max(int(torch.minimum(keep[..., 0], valid.sum(-1)).max()), 1)
        top, index = priority.topk(n, dim=-1)
        dropped = (torch.arange(n, device=index.device) >= keep) | (top == float("-inf"))
        # entries in slot order, empties last: StreamingLLM's sinks then sit in entries 0..n_sink-1
        slots = self.slots.gather(2, index).masked_fill(dropped, -1)
        order = torch.where(slots < 0, torch.iinfo(torch.long).max, slots).argsort(-1)
        index, slots = index.gather(2, order), slots.gather(2, order)
        for name in self._entry_tensors():
            t = getattr(self, name)
            setattr(self, name, t.gather(2, index.view(*index.shape, *[1] * (t.dim() - 3)).expand(
                *index.shape, *t.shape[3:])))
        self.slots = slots
        self.compressed = True
        policy.after_update(self)
        if self.quantization is not None:  # the kept entries, quantized; the full-precision ones are freed
            self.quantized = QuantizedKV.from_entries(self.geometry, self.quantization, self.k, self.v, self.slots,
                                                      self.seen)
            for name in self._entry_tensors():
                setattr(self, name, getattr(self, name)[:, :, :0].clone())

    # ------------------------------------------------------------------ attention
    def keys_values(self, expand: Expand | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries as the queries attend them: as stored, or as ``expand`` maps them."""
        if expand is not None:
            return expand(self.k)
        return self.k, self.k if self.v is None else self.v

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """Queries q [B, H, T, d] at the step's slots against every entry; [B, H, T, d_v]. Also lets the
        policy observe these queries' attention (every layer reading this cache adds to it)."""
        if self.quantized is not None:  # (its policy observes nothing once the prompt is compressed)
            return self.quantized.attend(q, step, scale=scale, expand=expand)
        d = q.shape[-1]
        keys, values = self.keys_values(expand)
        observing = self.policy.observes(self.compressed)
        if observing:
            self._observe(q, step.slots, scale, keys, observing)
        if scale is not None:  # fold a custom softmax scale into the queries (SDPA's default is d^-0.5)
            q = q * (scale * d ** 0.5)
        if not self.compressed and self.sliding_window is None:
            return causal_attention(q, keys, values, step)  # entries still in slot order: fast path
        mask = slot_mask(step.slots, self.slots, self.pad, self.sliding_window, none_if_unmasked=False)
        return grouped_attention(q, keys, values, mask)

    def probabilities(self, q: torch.Tensor, q_slots: torch.Tensor, scale: float | None,
                      keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention weights [B, h, G, T, S] (fp32) of queries q [B, H, T, d] over ``keys`` (the
        entries as attended; default: as stored), grouped by this cache's h K/V heads, and the mask
        [B, h, 1, T, S] they were computed under."""
        B, H, T, d = q.shape
        keys = self.k if keys is None else keys
        n, h = keys.shape[1], self.k.shape[1]
        scale = d ** -0.5 if scale is None else scale
        logits = torch.einsum("bngtd,bnsd->bngts", q.reshape(B, n, H // n, T, d).float(), keys.float()) * scale
        mask = slot_mask(q_slots, self.slots, self.pad, self.sliding_window, none_if_unmasked=False)[:, :, None]
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return probs.reshape(B, h, H // h, T, -1), mask

    def _observe(self, q: torch.Tensor, q_slots: torch.Tensor, scale, keys: torch.Tensor, mode: str) -> None:
        policy = self.policy
        start = int(q_slots[0])
        new_call = start != self.observed_call  # the first reader of this call's queries (YOCO has several)
        self.observed_call = start
        if mode == "tail":
            if new_call and not self.compressed and self.score is not None:
                self.score.zero_()  # a new call: only the prompt's last queries count
            tail = min(policy.observation_window, q.shape[2])
            q, q_slots = q[:, :, -tail:], q_slots[-tail:]
        for lo in range(0, q.shape[2], OBSERVE_BLOCK):
            block, block_slots = q[:, :, lo:lo + OBSERVE_BLOCK], q_slots[lo:lo + OBSERVE_BLOCK]
            probs, mask = self.probabilities(block, block_slots, scale, keys)
            policy.observed(self, probs, mask, block_slots, new_call=new_call and lo == 0)
