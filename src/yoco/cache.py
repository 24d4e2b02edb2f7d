"""The cache protocol and the caches shared by several mixers.

Every token mixer owns its cache kind and builds it with ``mixer.new_cache(...)``:

- ``KVCache`` (here): full causal attention's keys/values, and YOCO's single global K/V.
- ``RingKVCache`` (``mixers/sliding_window.py``): exactly W positions for sliding windows.
- ``RetentionState`` (``mixers/retention.py``): gated retention's fp32 recurrent state.

A model's cache is a ``ModelCache``: one entry per cache-owning mixer plus the number of slots
filled so far and the batch's left padding. Every cache reports ``nbytes()``: the bytes its tensors
hold, which is what the machine actually spends on it.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch

from .errors import YocoError


class CacheError(YocoError, RuntimeError):
    """A cache used beyond what it was built for (capacity, batch size)."""


class LayerCache(Protocol):
    batch_fields: tuple[str, ...]  # the tensor attributes whose first dimension is the batch

    def nbytes(self) -> int: ...


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
