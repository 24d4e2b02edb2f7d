"""The cache protocol and the caches shared by several mixers.

Every token mixer owns its cache kind and builds it with ``mixer.new_cache(...)``:

- ``KVCache`` (here): full causal attention's keys/values, and YOCO's single global K/V.
- ``RingKVCache`` (``mixers/sliding_window.py``): exactly W positions for sliding windows.
- ``LatentCache`` (``mixers/mla.py``): MLA's latent and rope key, one row per position.
- ``RetentionState`` (``mixers/retention.py``): gated retention's fp32 recurrent state.

Every cache that holds keys and values is an ``AttentionCache``: the mixer writes this call's keys and
values with ``append`` and gets its queries' attention over everything cached with ``attend``; it
never asks what kind of cache it holds. Without a cache a mixer uses ``CallKV``, which holds just
this call's keys and values, so the mixer code is one path. A compressed cache (``yoco.compress``)
is one more kind: a mixer describes what it caches (``KVGeometry``) and the policy builds the store.

A model's cache is a ``ModelCache``: one entry per cache-owning mixer plus the number of slots
filled so far and the batch's left padding. Every cache reports ``nbytes()``: the bytes its tensors
hold, which is what the machine actually spends on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import YocoError
from .kernels import causal_attention
from .layers import Step

# expand(rows) -> (k, v): stored rows mapped to per-head keys and values (MLA's decompressed path).
Expand = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CacheError(YocoError, RuntimeError):
    """A cache used beyond what it was built for (capacity, batch size)."""


class LayerCache(Protocol):
    batch_fields: tuple[str, ...]  # the tensor attributes whose first dimension is the batch

    def nbytes(self) -> int: ...


class AttentionCache(Protocol):
    """What every cache holding keys and values does; the only thing a mixer may call on one.

    Entries are written per call, then read by every query of the call (and, for shared caches,
    by other layers: CLA/MLKV consumers, YOCO's cross-decoder layers).
    """

    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> object:
        """Write this call's keys ``k`` and values ``v`` [B, n_kv, T, d] at the next T slots (``v``
        None: the rows are keys and values at once, as MLA's latent rows). A kind may return views of
        what it holds for its own tests; mixers do not use the return value."""

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """Attention [B, H, T, d_v] of this call's queries q [B, H, T, d] at ``step``'s slots over every
        entry cached, this call's included (so ``append`` comes first). ``scale``: the softmax scale
        (None: 1/sqrt(d)). ``expand(rows) -> (k, v)``: maps the stored rows to the per-head keys and
        values the queries attend (MLA's decompressed path); the cache applies it to whatever entries
        it attends. The same queries through any kind give the same result, up to the entries a
        compressed kind no longer holds."""

    def nbytes(self) -> int:
        """Bytes of the tensors it holds."""


@dataclass(frozen=True)
class KVGeometry:
    """What a mixer caches per position, for a store it does not build itself (a compressed one):
    ``n_kv_heads`` heads of ``key_dim`` keys and ``value_dim`` values, RoPE'd at their true positions.

    ``rotate(keys, delta)``: re-rotates cached keys by per-row position deltas (StreamingLLM moves its
    sinks, InfLLM sees far tokens at one distance); ``values_are_keys``: the rows are keys and values
    at once (MLA's latent, ``v`` is not stored); ``sliding_window``: a query at slot q sees slots
    > q - window (None: full attention)."""

    n_kv_heads: int
    key_dim: int
    value_dim: int
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    values_are_keys: bool = False
    sliding_window: int | None = None

    def store_options(self) -> dict:
        return {"n_kv_heads": self.n_kv_heads, "key_dim": self.key_dim, "value_dim": self.value_dim,
                "rotate": self.rotate, "values_are_keys": self.values_are_keys,
                "sliding_window": self.sliding_window}


def attend_in_slot_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, step: Step,
                         scale: float | None, expand: Expand | None) -> torch.Tensor:
    """``attend`` over entries at slots 0..S-1 in order (no per-row entries): the causal fast paths."""
    if expand is not None:
        k, v = expand(k)
    return causal_attention(q, k, k if v is None else v, step, scale)


class CallKV:
    """The keys and values of one forward call without a cache: the ``AttentionCache`` a mixer uses
    when it is given none (training, scoring), so it runs the same code as with a cache. The call
    starts at slot 0 (its keys are slots 0..T-1)."""

    batch_fields = ("k", "v")

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        if self.k is not None:
            raise CacheError("a call's own keys and values are written once (pass a cache to continue)")
        self.k, self.v = k, v

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        return attend_in_slot_order(q, self.k, self.v, step, scale, expand)

    def nbytes(self) -> int:
        return tensor_bytes(*(t for t in (self.k, self.v) if t is not None))


def map_rows(cache, rows):
    """A copy of a layer cache whose batch tensors are ``rows(tensor)`` (repeated or selected rows). A
    cache that keeps its rows in groups of its own maps them itself (``cache.with_rows(rows)``)."""
    if hasattr(cache, "with_rows"):
        return cache.with_rows(rows)
    clone = copy.copy(cache)
    for name in cache.batch_fields:
        setattr(clone, name, rows(getattr(cache, name)))
    return clone


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SlotCache:
    """Buffers written slot by slot along ``slot_dim``, the cache kind of every growing context.

    With a known ``capacity`` the buffers are allocated once at that size; without one they start
    small and double when full, so appending is amortised O(1) (never a per-token concatenation).
    Subclasses name their buffers in ``batch_fields`` and give each buffer's shape to ``__init__``
    with the slot dimension left as None.
    """

    batch_fields: tuple[str, ...] = ()
    slot_dim = 1
    kind = "cache"

    def __init__(self, shapes: dict[str, tuple], *, dtype: torch.dtype, device=None, capacity: int | None):
        self.growing = capacity is None
        size = 256 if capacity is None else capacity
        if size < 1:
            raise CacheError(f"{self.kind} capacity must be positive, got {capacity}")
        for name, shape in shapes.items():
            shape = tuple(size if n is None else n for n in shape)
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self.length = 0

    @property
    def capacity(self) -> int:
        return getattr(self, self.batch_fields[0]).shape[self.slot_dim]

    def _slots(self, tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return tensor.narrow(self.slot_dim, start, end - start)

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self.capacity)
        for name in self.batch_fields:
            old = getattr(self, name)
            shape = list(old.shape)
            shape[self.slot_dim] = size
            new = old.new_zeros(shape)
            self._slots(new, 0, self.length).copy_(self._slots(old, 0, self.length))
            setattr(self, name, new)

    def append(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write one tensor per buffer at the next T slots; return views of every slot so far."""
        T = values[0].shape[self.slot_dim]
        end = self.length + T
        if end > self.capacity:
            if not self.growing:
                raise CacheError(f"{self.kind} holds {self.capacity} positions; writing {T} more "
                                 f"after {self.length} exceeds it (allocate a larger capacity)")
            self._grow(end)
        for name, value in zip(self.batch_fields, values):
            self._slots(getattr(self, name), self.length, end).copy_(value)
        self.length = end
        return tuple(self._slots(getattr(self, name), 0, end) for name in self.batch_fields)

    def nbytes(self) -> int:
        return tensor_bytes(*(getattr(self, name) for name in self.batch_fields))


class KVCache(SlotCache):
    """Keys and values of every position so far, [B, n_kv, capacity, d], written by slot."""

    batch_fields = ("k", "v")
    slot_dim = 2
    kind = "KV cache"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, capacity: int | None = None):
        shape = (batch_size, n_kv_heads, None, head_dim)
        super().__init__({"k": shape, "v": shape}, dtype=dtype, device=device, capacity=capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, d] at the next T slots; return views of every slot so far."""
        return super().append(k, v)

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """Queries at the step's slots over slots 0..length-1 (this call's last), the causal fast paths."""
        return attend_in_slot_order(q, self._slots(self.k, 0, self.length), self._slots(self.v, 0, self.length),
                                    step, scale, expand)


class ModelCache:
    """A model's inference state: one cache per cache-owning mixer, in the model's order.

    ``seen`` is the number of slots already processed (the same for every row); ``pad`` holds each
    row's left padding (or None).
    """

    def __init__(self, layers: list, batch_size: int, pad: torch.Tensor | None = None, compression=None):
        self.layers = layers
        self.batch_size = batch_size
        self.pad = pad
        self.seen = 0
        self.compression = compression  # the policy of the layers that compress (yoco.compress), or None

    def compress(self) -> None:
        """Apply the compression policy to the prompt now in the cache (call once, after prefill)."""
        if self.compression is None:
            raise CacheError("this cache has no compression policy (new_cache(compression=...))")
        for layer in self.layers:
            if hasattr(layer, "compress"):
                layer.compress()

    def index_bytes(self) -> int:
        """Bookkeeping of compressed layers beside their K/V (slots, scores)."""
        return sum(c.index_bytes() for c in self.layers if hasattr(c, "index_bytes"))

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers if c is not None)

    def offloaded_bytes(self) -> int:
        """Bytes a compressed layer moved off the compute device (InfLLM's memory units)."""
        return sum(c.offloaded_bytes() for c in self.layers if hasattr(c, "offloaded_bytes"))

    def repeat(self, n: int) -> "ModelCache":
        """A cache of n copies of each row: n continuations of the same prompt (sampling several
        answers, or measuring batched decode at a context without prefilling every row)."""
        if n < 1:
            raise CacheError(f"repeat count must be >= 1, got {n}")
        return self.with_rows(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, rows: torch.Tensor) -> "ModelCache":
        """A cache of the given rows, in that order (beam search keeps the best beams' rows)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self.with_rows(lambda t: t.index_select(0, rows.to(t.device)))

    def with_rows(self, rows) -> "ModelCache":
        """A copy whose every batch tensor (and the padding) is ``rows(tensor)``."""
        clone = ModelCache([map_rows(c, rows) for c in self.layers], len(rows(torch.arange(self.batch_size))),
                           None if self.pad is None else rows(self.pad), self.compression)
        clone.seen = self.seen
        return clone

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------- sequences decoded together
class RowsCache:
    """One layer's ``AttentionCache`` over several sequences decoded in one call: row b is sequence b,
    whose entries stay in that sequence's own cache (its own kind, length and capacity). ``append`` and
    ``attend`` go to each row's cache with the row's own step, so rows of any lengths and arrival times
    share the call's matmuls without being re-padded or copied. ``offsets[b]``: how many slots row b
    is behind the batch's step (the batch runs at its longest row's slot)."""

    def __init__(self, rows: list, offsets: list[int]):
        self.rows, self.offsets = rows, offsets

    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        for b, cache in enumerate(self.rows):
            cache.append(k[b:b + 1]) if v is None else cache.append(k[b:b + 1], v[b:b + 1])

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        return torch.cat([cache.attend(q[b:b + 1], Step(step.start - offset, step.length, None, step.device),
                                       scale=scale, expand=expand)
                          for b, (cache, offset) in enumerate(zip(self.rows, self.offsets))])

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.rows)


class StackedRows:
    """One layer's state caches of several sequences decoded in one call (a recurrent state, which its
    mixer reads and replaces whole): reading a batch field gives the rows' tensors stacked, assigning
    one gives row b its slice back, so each sequence keeps its own state."""

    def __init__(self, rows: list):
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "batch_fields", rows[0].batch_fields)

    def __getattr__(self, name: str):
        if name in self.batch_fields:
            return torch.cat([getattr(row, name) for row in self.rows])
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name not in self.batch_fields:
            raise AttributeError(f"a stacked state sets its rows' batch fields only, not {name!r}")
        for b, row in enumerate(self.rows):
            setattr(row, name, value[b:b + 1])

    def nbytes(self) -> int:
        return sum(row.nbytes() for row in self.rows)


class RowBatch(ModelCache):
    """Several sequences' ``ModelCache``s (one row each) as one batch for a model call: how a server
    decodes sequences of different lengths together. The call runs at the longest row's slot and each
    row counts as left-padded by how far it is behind, so its RoPE positions are its own; its entries
    stay in its own caches (``RowsCache``, ``StackedRows``), which its queries alone attend. Advancing
    ``seen`` advances every row's."""

    def __init__(self, caches: list[ModelCache], device=None):
        if not caches or any(c.batch_size != 1 for c in caches):
            raise CacheError("a row batch is built from one-row caches (at least one)")
        self.caches = caches
        top = max(c.seen for c in caches)
        offsets = [top - c.seen for c in caches]
        pad = torch.tensor(offsets, device=device) if any(offsets) else None
        layers = [RowsCache(rows, offsets) if hasattr(rows[0], "attend") else StackedRows(rows)
                  for rows in zip(*(c.layers for c in caches))]
        super().__init__(layers, len(caches), pad)
        self._seen = top

    @property
    def seen(self) -> int:
        return self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        if hasattr(self, "_seen"):  # (ModelCache.__init__ sets 0 before the rows' count is known)
            for cache in self.caches:
                cache.seen += value - self._seen
            self._seen = value
