"""Quantized K/V caches: keys and values stored in 8, 4 or 2 bits, as in KIVI (arXiv 2402.02750).

- Keys are quantized **per channel**: each channel of a group of G consecutive tokens shares one scale
  and zero point (key outliers live in a few channels, so a channel's range is narrow). Values are
  quantized **per token**: each run of G channels of one token shares them. Asymmetric:
  ``scale = (max - min) / (2^b - 1)``, ``code = round((x - min) / scale)``, ``x ~ code * scale + min``.
- The most recent tokens stay in full precision (the residual, at least R of them): the residual is
  folded into the quantized part G tokens at a time once it holds R + G (keys need a whole group of
  tokens per channel), so it always holds R..R+G-1 tokens once the row is long enough.
- Codes of 4 and 2 bits are packed two and four to a uint8; scales and zero points are float32.
- A call's own keys and values are attended in full precision (as they come from the projections);
  older entries are dequantized block by block as the queries read them, so the whole cache is never
  materialised in full precision.
- Left padding: each row stores its real tokens from its own first one, so its groups, its folding
  and therefore its codes are exactly what the row alone would have (a padded batch == rows alone).

``QuantizedKV`` is an ``AttentionCache`` for any ``KVGeometry`` (a Transformer layer's K/V, YOCO's
global K/V — quantized once and read by every cross-decoder layer —, MLA's latent rows), built by
``model.new_cache(kv_bits=...)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from . import native
from .cache import CacheError, Expand, KVGeometry, tensor_bytes
from .errors import YocoError
from .kernels import NATIVE_QUERIES, attention_part, merge_parts, native_decode_buffers, slot_mask
from .layers import Step

KV_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float32  # scales and zero points; their bytes are counted like the codes'
DEFAULT_GROUP = 32  # KIVI's group size
DEFAULT_RESIDUAL = 128  # KIVI's full-precision window
READ_BLOCK = 4096  # positions dequantized at a time when queries read the quantized part
# Few queries (decode) read the quantized part in two passes holding every position's score; more
# (a prefill chunk) read it block by block, merging the blocks' attentions by log-sum-exp.
SCORES_BYTES = 64 << 20


class QuantizationError(YocoError, ValueError):
    """Quantization settings that cannot be used (a bit width, a group size, a geometry they cannot pack)."""


@dataclass(frozen=True)
class KVQuantization:
    """How a cache is quantized: ``bits`` per key/value, ``group`` tokens (keys) or channels (values)
    per scale and zero point, ``residual`` recent tokens kept in full precision."""

    bits: int
    group: int = DEFAULT_GROUP
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise QuantizationError(f"kv bits must be one of {', '.join(map(str, KV_BITS))}, got {self.bits}")
        if self.group < 1:
            raise QuantizationError(f"kv group size must be >= 1, got {self.group}")
        if self.residual < 0:
            raise QuantizationError(f"kv residual must be >= 0 tokens, got {self.residual}")

    def check(self, geometry: KVGeometry) -> None:
        """Refuse a geometry these settings cannot pack: packed runs need whole bytes (keys are packed
        along a group's tokens, values along a token's channels), and values are grouped along their
        channels. (Sliding windows keep their fixed ring; they are not quantized.)"""
        if geometry.sliding_window is not None:
            raise QuantizationError("a sliding-window cache is not quantized (its ring is fixed-size)")
        per_byte = 8 // self.bits
        if self.group % per_byte:
            raise QuantizationError(f"{self.bits}-bit codes pack {per_byte} to a byte along a group's tokens: the kv "
                                    f"group size {self.group} is not a multiple of {per_byte}")
        if not geometry.values_are_keys and geometry.value_dim % per_byte:
            raise QuantizationError(f"{self.bits}-bit codes pack {per_byte} to a byte: the value dim "
                                    f"{geometry.value_dim} is not a multiple of {per_byte}")
        if not geometry.values_are_keys and geometry.value_dim % self.group:
            raise QuantizationError(f"kv group size {self.group} must divide the value dim {geometry.value_dim} "
                             f"(values are quantized in groups of channels)")


def as_quantization(kv_bits) -> KVQuantization | None:
    """``kv_bits`` as the API takes it: None (full precision), a bit width, or a ``KVQuantization``."""
    if kv_bits is None or isinstance(kv_bits, KVQuantization):
        return kv_bits
    if isinstance(kv_bits, bool) or not isinstance(kv_bits, int):
        raise QuantizationError(f"kv_bits must be an int ({', '.join(map(str, KV_BITS))}) or a KVQuantization, "
                         f"got {kv_bits!r}")
    return KVQuantization(kv_bits)


# ---------------------------------------------------------------------- codes
def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of x along ``dim`` (one scale and zero point per slice): codes (uint8,
    0..2^b-1, not packed), scale and zero (float32, ``dim`` kept with size 1). A constant slice gets
    scale 1 and codes 0, so it is restored exactly."""
    x = x.to(SCALE_DTYPE)
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (high - low) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - low) / scale).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.to(SCALE_DTYPE) * scale + zero).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] of ``bits`` each -> [..., m = n * bits / 8], planar: byte j holds codes
    j, j + m, j + 2m, ..., the first in the low bits (so a vector of consecutive bytes unpacks into
    consecutive codes with one shift: the native kernel's layout)."""
    per = 8 // bits
    if per == 1:
        return codes
    planes = codes.reshape(*codes.shape[:-1], per, -1)
    packed = planes[..., 0, :].clone()
    for i in range(1, per):
        packed |= planes[..., i, :] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack``: [..., m] -> uint8 codes [..., m * 8 / bits]."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2 ** bits - 1
    planes = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(planes, dim=-2).reshape(*packed.shape[:-1], -1)


# ---------------------------------------------------------------------- the cache kind
class QuantizedKV:
    """A quantized ``AttentionCache`` of [B, n_kv, positions, dim] keys (and values).

    Per row b: ``quantized[b]`` positions (a multiple of G) in codes, then ``held[b]`` in the
    full-precision residual; together its real tokens, from its first (row b's slot ``pad[b]``).
    Quantized buffers are allocated at the capacity when it is known, else for ``initial_positions``
    and grown by doubling."""

    def __init__(self, geometry: KVGeometry, quantization: KVQuantization, batch_size: int, *,
                 dtype: torch.dtype, device=None, capacity: int | None = None, pad: torch.Tensor | None = None,
                 initial_positions: int = 256):
        quantization.check(geometry)
        self.geometry, self.q = geometry, quantization
        self.dtype, self.device = dtype, device
        self.batch_size = batch_size
        self.pad = [0] * batch_size if pad is None else [int(p) for p in pad.tolist()]
        self.quantized = [0] * batch_size
        self.held = [0] * batch_size
        self.length = 0  # slots written (every row alike, pads included)
        self.capacity = capacity
        G, R = quantization.group, quantization.residual
        h, dk, dv = geometry.n_kv_heads, geometry.key_dim, geometry.value_dim
        has_values = not geometry.values_are_keys
        self.residual_k = torch.zeros(batch_size, h, R + G if capacity is None else min(capacity, R + G), dk,
                                      dtype=dtype, device=device)
        self.residual_v = torch.zeros(*self.residual_k.shape[:3], dv, dtype=dtype, device=device) \
            if has_values else None
        # Per-head entry slots, when entries are not every row's tokens in order (a compression policy
        # kept a subset per head: ``from_entries``); None: row b's stored position i holds slot pad[b] + i.
        self.entry_slots: torch.Tensor | None = None
        self.residual_slots: torch.Tensor | None = None
        self.before = [0] * batch_size  # stored positions of each row before the latest call
        slots = G * (max(0, (initial_positions if capacity is None else capacity) - R) // G)
        self._allocate(slots)
        # (first slot, k, v) of the last call, kept until the next: every reader of a shared cache (YOCO's
        # cross-decoder layers, CLA/MLKV consumers) attends the call's own entries in full precision
        self.call: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    # buffers of the quantized part: codes per position, scales per key group / value channel group
    def _shapes(self, slots: int) -> dict[str, tuple]:
        B, h, G, b = self.batch_size, self.geometry.n_kv_heads, self.q.group, self.q.bits
        dk, dv = self.geometry.key_dim, self.geometry.value_dim
        # keys: each channel's codes of a group's G tokens packed together (the kernel reads them as vectors)
        shapes = {"k_codes": ((B, h, slots // G, dk, G * b // 8), torch.uint8),
                  "k_scale": ((B, h, slots // G, dk), SCALE_DTYPE), "k_zero": ((B, h, slots // G, dk), SCALE_DTYPE)}
        if not self.geometry.values_are_keys:
            shapes |= {"v_codes": ((B, h, slots, dv * b // 8), torch.uint8),
                       "v_scale": ((B, h, slots, dv // G), SCALE_DTYPE), "v_zero": ((B, h, slots, dv // G), SCALE_DTYPE)}
        shapes["entry_slots"] = ((B, h, slots), torch.long)
        return shapes

    def _allocate(self, slots: int) -> None:
        old = {name: getattr(self, name, None) for name in self._shapes(0)}
        for name, (shape, dtype) in self._shapes(slots).items():
            if name == "entry_slots" and self.entry_slots is None:
                continue
            new = torch.zeros(shape, dtype=dtype, device=self.device)
            if old[name] is not None:
                n = old[name].shape[2]
                new[:, :, :n] = old[name]
            setattr(self, name, new)
        self.quantized_slots = slots

    @property
    def batch_fields(self) -> tuple[str, ...]:
        names = tuple(self._shapes(0)) + ("residual_k", "residual_v", "residual_slots")
        return tuple(n for n in names if getattr(self, n) is not None)

    @classmethod
    def from_entries(cls, geometry: KVGeometry, quantization: KVQuantization, k: torch.Tensor, v: torch.Tensor | None,
                     slots: torch.Tensor, length: int) -> "QuantizedKV":
        """The entries a compression policy kept, k/v [B, h, S, d] at per-head slots [B, h, S] (-1:
        empty) after ``length`` slots, quantized in entry order; the tokens appended next follow them."""
        B, h, S, _ = k.shape
        cache = cls(geometry, quantization, B, dtype=k.dtype, device=k.device, initial_positions=S)
        cache.entry_slots = torch.full((B, h, cache.quantized_slots), -1, dtype=torch.long, device=k.device)
        cache.residual_slots = torch.full(cache.residual_k.shape[:3], -1, dtype=torch.long, device=k.device)
        for b in range(B):
            cache._write_row(b, k[b], None if v is None else v[b], slots[b])
        cache.length = length
        return cache

    def index_bytes(self) -> int:
        """The per-head entry slots a policy's kept entries need (none for a row's tokens in order)."""
        return 0 if self.entry_slots is None else tensor_bytes(self.entry_slots, self.residual_slots)

    def nbytes(self) -> int:
        """Bytes of the codes, scales and zero points, and the residual (not the entry slots)."""
        return tensor_bytes(*(getattr(self, n) for n in self.batch_fields if not n.endswith("slots")))

    # ------------------------------------------------------------------ writing
    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Write this call's k, v [B, n_kv, T, d]; each row keeps its real tokens (its pads are not
        stored) and folds its residual into codes G tokens at a time."""
        if (v is None) != self.geometry.values_are_keys:
            raise CacheError("a latent-row cache takes rows alone; a K/V cache takes keys and values")
        T = k.shape[2]
        if self.capacity is not None and self.length + T > self.capacity:
            raise CacheError(f"quantized KV cache holds {self.capacity} positions; writing {T} more after "
                             f"{self.length} exceeds it (allocate a larger capacity)")
        self.call = (self.length, k, v)
        self.before = [n + m for n, m in zip(self.quantized, self.held)]
        slots = None
        if self.entry_slots is not None:  # every head stores the new tokens at their own slots
            slots = torch.arange(self.length, self.length + T, device=k.device).expand(k.shape[1], T)
        for b in range(self.batch_size):
            first = max(0, self.pad[b] - self.length)  # this call's first real token of row b
            if first < T:
                self._write_row(b, k[b, :, first:], None if v is None else v[b, :, first:],
                                None if slots is None else slots[:, first:])
        self.length += T

    def _write_row(self, b: int, k: torch.Tensor, v: torch.Tensor | None, slots: torch.Tensor | None = None) -> None:
        """Row b's next positions k [h, n, dk] (v [h, n, dv]; with per-head entry slots, ``slots`` [h, n])."""
        G, R = self.q.group, self.q.residual
        held = self.held[b]
        keys = torch.cat((self.residual_k[b, :, :held], k.to(self.dtype)), dim=1)
        values = None if v is None else torch.cat((self.residual_v[b, :, :held], v.to(self.dtype)), dim=1)
        if slots is not None:
            slots = torch.cat((self.residual_slots[b, :, :held], slots), dim=1)
        total = keys.shape[1]
        groups = (total - R) // G if total >= R + G else 0
        if groups:
            n = groups * G
            start = self.quantized[b]
            if start + n > self.quantized_slots:
                self._allocate(max(start + n, 2 * self.quantized_slots))
            self._write_codes(b, start, keys[:, :n], None if values is None else values[:, :n])
            if slots is not None:
                self.entry_slots[b, :, start:start + n] = slots[:, :n]
                slots = slots[:, n:]
            self.quantized[b] = start + n
            keys, values = keys[:, n:], None if values is None else values[:, n:]
        self.held[b] = keys.shape[1]
        self.residual_k[b, :, :self.held[b]] = keys
        if values is not None:
            self.residual_v[b, :, :self.held[b]] = values
        if slots is not None:
            self.residual_slots[b, :, :self.held[b]] = slots

    def _write_codes(self, b: int, start: int, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Quantize n = groups x G positions of row b (k [h, n, dk], v [h, n, dv]) into slots start.."""
        G, bits = self.q.group, self.q.bits
        h, n, dk = k.shape
        codes, scale, zero = quantize(k.reshape(h, n // G, G, dk), bits, dim=2)  # per channel over G tokens
        self.k_codes[b, :, start // G:(start + n) // G] = pack(codes.transpose(2, 3), bits)
        self.k_scale[b, :, start // G:(start + n) // G] = scale[:, :, 0]
        self.k_zero[b, :, start // G:(start + n) // G] = zero[:, :, 0]
        if v is not None:
            dv = v.shape[-1]
            codes, scale, zero = quantize(v.reshape(h, n, dv // G, G), bits, dim=3)  # per token over G channels
            self.v_codes[b, :, start:start + n] = pack(codes.reshape(h, n, dv), bits)
            self.v_scale[b, :, start:start + n] = scale[..., 0]
            self.v_zero[b, :, start:start + n] = zero[..., 0]

    # ------------------------------------------------------------------ reading
    def dequantized(self, start: int, end: int, keys: bool = True,
                    values: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Positions start..end-1 of every row's quantized part in the cache dtype: keys [B, h, n, dk] and
        values (None for latent rows, or when not asked for)."""
        G, bits = self.q.group, self.q.bits
        B, h = self.batch_size, self.geometry.n_kv_heads
        n = end - start
        k = None
        if keys:
            # the key groups covering start..end-1, each group's scale and zero point broadcast over its G
            # tokens (the buffers hold whole groups), then cut to the positions asked for
            g0, g1 = start // G, -(-end // G)
            codes = unpack(self.k_codes[:, :, g0:g1], bits).transpose(3, 4).contiguous()  # [B, h, groups, G, dk]
            dk = codes.shape[-1]
            k = dequantize(codes, self.k_scale[:, :, g0:g1, None],
                           self.k_zero[:, :, g0:g1, None], self.dtype).reshape(B, h, (g1 - g0) * G, dk)
            k = k[:, :, start - g0 * G:][:, :, :n]
        if self.geometry.values_are_keys or not values:
            return k, None
        dv = self.geometry.value_dim
        codes = unpack(self.v_codes[:, :, start:end], bits).reshape(B, h, n, dv // G, G)
        v = dequantize(codes, self.v_scale[:, :, start:end, :, None], self.v_zero[:, :, start:end, :, None], self.dtype)
        return k, v.reshape(B, h, n, dv)

    def position_slots(self, entry_slots: torch.Tensor | None, start: int, end: int, counts: list[int],
                       offset: torch.Tensor) -> torch.Tensor:
        """The slots [B, 1 or h, n] held by stored positions start..end-1 of a part (codes or residual)
        of which row b holds ``counts[b]`` (-1 beyond): the per-head entry slots, or else, row b's
        position i of the part holding slot pad[b] + offset[b] + i."""
        device = self.residual_k.device
        position = torch.arange(start, end, device=device)
        real = position < torch.tensor(counts, device=device)[:, None, None]
        if entry_slots is not None:
            return torch.where(real, entry_slots[:, :, start:end], -1)
        first = (torch.tensor(self.pad, device=device) + offset.to(device))[:, None, None]
        return torch.where(real, first + position, -1)

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """This call's queries over the quantized part (dequantized a block at a time), the residual,
        and the call's own entries in full precision, merged by their log-sum-exp."""
        if self.call is None or not self.call[0] <= step.start < self.call[0] + self.call[1].shape[2]:
            raise CacheError("attend follows the append of the same call (its queries at that call's slots)")
        first, call_k, call_v = self.call
        # Entries of this call are attended from the call's own full-precision tensors, so the stored
        # ones are cut where the call began (``before``: each row's stored positions then).
        parts = []
        quantized = [min(n, m) for n, m in zip(self.quantized, self.before)]
        held = [max(0, m - n) for n, m in zip(self.quantized, self.before)]

        def part(keys, values, slots, counts):
            """Entries [B, h, n, d] at slots [B, 1 or h, n] (-1: none); ``counts``: each row's real ones."""
            if expand is not None:
                keys, values = expand(keys)
            values = keys if values is None else values
            if self.entry_slots is None and step.pad is None and all(c == keys.shape[2] for c in counts):
                parts.append(attention_part(q, keys, values, None, scale=scale))  # all before every query
                return
            mask = slot_mask(step.slots, slots, step.pad, None, none_if_unmasked=False)
            parts.append(attention_part(q, keys, values, mask, scale=scale))

        n = max(quantized)
        fused = self._attend_native(q, quantized, scale) if n and expand is None else None
        if fused is not None:
            parts.append(fused)
        elif n:
            slots = self.position_slots(self.entry_slots, 0, n, quantized, torch.zeros(self.batch_size, dtype=torch.long))
            if expand is None and q.shape[0] * q.shape[1] * q.shape[2] * n * 4 <= SCORES_BYTES:
                parts.append(self._attend_codes(q, n, slots, quantized, step, scale))
            else:
                for start in range(0, n, READ_BLOCK):
                    end = min(n, start + READ_BLOCK)
                    keys, values = self.dequantized(start, end)
                    part(keys, values, slots[..., start:end], [max(0, min(end, c) - start) for c in quantized])
        if max(held):
            n = max(held)
            slots = self.position_slots(self.residual_slots, 0, n, held, torch.tensor(self.quantized))
            part(self.residual_k[:, :, :n], None if self.residual_v is None else self.residual_v[:, :, :n], slots, held)
        keys, values = (call_k, call_v) if expand is None else expand(call_k)
        parts.append(call_part(q, keys, keys if values is None else values, step, first, scale))
        return merge_parts(parts, q.dtype)

    def _attend_native(self, q: torch.Tensor, counts: list[int],
                       scale: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Attention (and log-sum-exp) of few queries over each row's first ``counts[b]`` quantized
        positions by the native kernel (``csrc/decode_attention.c``: codes unpacked into vectors, key
        scales folded into the queries, online softmax, both cores), or None where it does not apply: not
        on the CPU, latent rows, a policy's per-head entries, many queries (a prefill chunk: the blockwise
        matmuls are faster there), buffers whose rows are not dense, or shapes the kernel declines."""
        B, H, T, d = q.shape
        h = self.geometry.n_kv_heads
        M = (H // h) * T
        if (q.device.type != "cpu" or self.geometry.values_are_keys or self.entry_slots is not None
                or M > NATIVE_QUERIES):
            return None
        buffers = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
        # the kernel takes a stride per row and K/V head; what is inside each must be dense
        if not all(_dense_after_head(t) for t in buffers) \
                or self.k_scale.stride() != self.k_zero.stride() or self.v_scale.stride() != self.v_zero.stride():
            return None
        lib = native.library()
        if lib is None:
            return None
        dv = self.geometry.value_dim
        grouped, out, lse = native_decode_buffers(q, h, dv, scale)
        rows = torch.tensor(counts, dtype=torch.long)
        status = lib.yoco_quantized_attention(
            grouped.data_ptr(), grouped.stride(0), grouped.stride(1),
            self.k_codes.data_ptr(), self.k_codes.stride(0), self.k_codes.stride(1),
            self.k_scale.data_ptr(), self.k_zero.data_ptr(), self.k_scale.stride(0), self.k_scale.stride(1),
            self.v_codes.data_ptr(), self.v_codes.stride(0), self.v_codes.stride(1),
            self.v_scale.data_ptr(), self.v_zero.data_ptr(), self.v_scale.stride(0), self.v_scale.stride(1),
            rows.data_ptr(), B, h, M, d, dv, self.q.bits, self.q.group, torch.get_num_threads(),
            out.data_ptr(), lse.data_ptr())
        if status:
            return None
        return out.reshape(B, H, T, dv).to(q.dtype), lse.reshape(B, H, T)

    def _attend_codes(self, q: torch.Tensor, n: int, slots: torch.Tensor, counts: list[int], step: Step,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention (and log-sum-exp) of few queries (decode) over the quantized positions 0..n-1, in two
        passes over the codes: every score, a block of keys dequantized at a time; then the softmax of
        them all and the values, a block at a time. The scores of every position are held (a few bytes
        per position and query), never the keys or values in full precision."""
        B, H, T, d = q.shape
        h = self.geometry.n_kv_heads
        grouped = q.reshape(B, h, (H // h) * T, d).to(SCALE_DTYPE)  # a K/V head's queries together
        scores = torch.empty(B, h, grouped.shape[2], n, dtype=SCALE_DTYPE, device=q.device)
        for start in range(0, n, READ_BLOCK):
            end = min(n, start + READ_BLOCK)
            keys = self.dequantized(start, end, values=False)[0]
            torch.matmul(grouped, keys.to(SCALE_DTYPE).transpose(-1, -2), out=scores[..., start:end])
        scores.mul_(d ** -0.5 if scale is None else scale)
        if step.pad is not None or any(c != n for c in counts) or self.entry_slots is not None:
            allowed = slot_mask(step.slots, slots, step.pad, None, none_if_unmasked=False)  # [B, 1 or h, T, n]
            heads = allowed.shape[1]
            allowed = allowed[:, :, None].expand(B, heads, H // h, T, n).reshape(B, heads, (H // h) * T, n)
            scores.masked_fill_(~allowed, float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)
        weights = scores.sub_(lse).exp_().nan_to_num_(0.0)
        out = None
        for start in range(0, n, READ_BLOCK):
            end = min(n, start + READ_BLOCK)
            keys, values = self.dequantized(start, end, keys=self.geometry.values_are_keys)
            values = keys if values is None else values
            piece = weights[..., start:end] @ values.to(SCALE_DTYPE)
            out = piece if out is None else out.add_(piece)
        dv = out.shape[-1]
        return out.reshape(B, H, T, dv).to(q.dtype), lse.reshape(B, H, T)

    def with_rows(self, rows) -> "QuantizedKV":
        """A copy of rows ``rows(tensor)`` (repeated or selected, ``cache.map_rows``): the tensors and each
        row's counts alike."""
        index = rows(torch.arange(self.batch_size)).tolist()
        clone = copy.copy(self)
        for name in self.batch_fields:
            setattr(clone, name, rows(getattr(self, name)))
        clone.batch_size = len(index)
        clone.pad, clone.quantized, clone.held, clone.before = ([values[i] for i in index] for values in
                                                                (self.pad, self.quantized, self.held, self.before))
        clone.call = None
        return clone

    # ------------------------------------------------------------------ facts
    @staticmethod
    def bytes_per_row(geometry: KVGeometry, quantization: KVQuantization, context: int, dtype: torch.dtype) -> int:
        """What ``nbytes()`` of one row allocated at ``context`` positions is: packed codes, scales and
        zero points of the positions that can be quantized, and the full-precision residual."""
        G, R, bits = quantization.group, quantization.residual, quantization.bits
        slots = G * (max(0, context - R) // G)
        held = min(context, R + G)
        dims = [geometry.key_dim] + ([] if geometry.values_are_keys else [geometry.value_dim])
        codes = sum(slots * d * bits // 8 for d in dims)
        scales = 2 * SCALE_DTYPE.itemsize * ((slots // G) * geometry.key_dim
                                             + (0 if geometry.values_are_keys else slots * geometry.value_dim // G))
        return geometry.n_kv_heads * (codes + held * sum(dims) * dtype.itemsize) + geometry.n_kv_heads * scales


def _dense_after_head(t: torch.Tensor) -> bool:
    """Whether the dims after [B, h] of ``t`` are laid out densely, in order (strides alone, no copy)."""
    expected = 1
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def call_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, first: int,
              scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The call's queries (its last ones: YOCO's cross-decoder runs only where logits are wanted) over
    the call's own entries (slots first..first+T-1): causal."""
    T = k.shape[2]
    if step.pad is None and step.start == first:
        return attention_part(q, k, v, None, causal=T > 1, scale=scale)
    if step.pad is None and step.length == 1 and step.start == first + T - 1:
        return attention_part(q, k, v, None, scale=scale)  # the last query sees the whole call
    mask = slot_mask(step.slots, torch.arange(first, first + T, device=q.device), step.pad, None,
                     none_if_unmasked=False)
    return attention_part(q, k, v, mask, scale=scale)


__all__ = ["KVQuantization", "KV_BITS", "QuantizationError", "QuantizedKV", "as_quantization", "dequantize", "pack", "quantize", "unpack"]
