"""A transformers causal LM (Llama / Mistral / Qwen2 / Qwen3 families) run by yoco's engine.

``TransformersLM(model)`` implements the engine's model protocol (``yoco.engine.EngineModel``), so
``generate``, chunked prefill, left-padded batches and ``yoco bench`` run it exactly as they run a
yoco model. At every call it passes explicit ``position_ids`` (each row's true positions after its
left padding). Its uncompressed cache is ``TransformersCache``, transformers' own ``DynamicCache``
with what the engine reads; a compressed one is ``yoco.compress.hf.CompressedCache``, which the policy
builds (``policy.new_transformers_cache``: the core never imports ``yoco.compress``). Either cache runs the
model over its inputs itself (``cache.run(model, ...)``): the plain one with the padding mask, the
compressed one through its own attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, QuantizedCache

from .cache import CacheError, tensor_bytes
from .hf import cache_arg
from .models.base import InputError
from .quantize import as_quantization

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_model(model):
    """The model's transformers config, if it is of a family yoco runs (else InputError)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise InputError(f"yoco supports transformers models of type {', '.join(SUPPORTED)}; "
                         f"got {model_type or type(model).__name__}")
    return config


@dataclass(frozen=True)
class TransformersLimits:
    """What the engine reads of a transformers model's config (``engine.EngineLimits``)."""

    max_seq_len: int  # its max_position_embeddings
    vocab_size: int
    arch: str  # its model_type


class EngineReads:
    """What yoco's engine reads of a transformers cache, beside the cache itself: the rows' left pads,
    the slots seen, and running the model over the next inputs."""

    compression = None

    def compress(self) -> None:
        raise CacheError("this cache has no compression policy (new_cache(compression=...))")

    def repeat(self, n: int):
        """n copies of each row, in place (transformers' cache reorders itself); returns the cache."""
        if n < 1:
            raise CacheError(f"repeat count must be >= 1, got {n}")
        self.batch_repeat_interleave(n)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)
        return self

    def run(self, model, input_ids: torch.Tensor, **inputs):
        """``model``'s output over the next ``input_ids`` after the slots seen, reading and updating the
        cache; the rows' left pads are masked out."""
        T = input_ids.shape[1]
        mask = None
        if self.pad is not None:
            mask = (torch.arange(self.seen + T, device=input_ids.device)[None] >= self.pad[:, None]).long()
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **inputs, **cache_arg(self))
        self.seen += T
        return out


class TransformersCache(EngineReads, DynamicCache):
    """transformers' own uncompressed cache, with what yoco's engine reads (the baseline)."""

    def __init__(self, config, pad: torch.Tensor | None):
        super().__init__(config=config)
        self.pad, self.seen = pad, 0

    def nbytes(self) -> int:
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.layers if layer.is_initialized)


# transformers' QuantizedCache backend for each bit width yoco compares: quanto for 4 and 2 bits (its
# group-wise integer backend of the KIVI kind, the one transformers' docs use; ``pip install
# optimum-quanto``), and the built-in fp8 backend for 8 bits (quanto has no 8-bit codes, and fp8 needs
# no extra package; it quantizes per tensor, not per group).
QUANTIZED_BACKENDS = {4: "quanto", 2: "quanto", 8: "fp8"}


class TransformersQuantizedCache(EngineReads, QuantizedCache):
    """transformers' own ``QuantizedCache`` (the peer of yoco's quantized caches), with what yoco's
    engine reads: the backend of ``QUANTIZED_BACKENDS``, the group size and residual yoco uses."""

    def __init__(self, config, batch_size: int, pad: torch.Tensor | None, quantization):
        backend = QUANTIZED_BACKENDS.get(quantization.bits)
        options = {} if backend == "fp8" else dict(nbits=quantization.bits, q_group_size=quantization.group,
                                                   residual_length=quantization.residual)
        try:
            super().__init__(backend, config, **options)
        except (ImportError, ValueError) as error:  # a backend not installed, or not in this transformers
            raise InputError(f"transformers' QuantizedCache ({backend} backend, {quantization.bits} bits) is not "
                             f"available here: {str(error).strip()}") from None
        self.backend, self.rows = backend, batch_size
        self.pad, self.seen = pad, 0

    def nbytes(self) -> int:
        """The residual in full precision and the quantized states, whatever tensors the backend keeps."""
        return sum(stored_bytes(layer.keys) + stored_bytes(layer.values) + stored_bytes(layer._quantized_keys)
                   + stored_bytes(layer._quantized_values) for layer in self.layers if layer.is_initialized)

    def batch_repeat_interleave(self, n: int) -> None:
        # transformers' repeat moves only the full-precision states; its beam reorder moves the quantized
        # ones too, each backend its own way (5.24 does; 5.4's moved only the residual too, so there the
        # quantized states are requantized from their repeat)
        index = torch.arange(self.rows).repeat_interleave(n)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if hasattr(layer, "_pending_beam_idx") or not hasattr(layer, "axis_key"):
                layer.reorder_cache(index)
                continue
            for name, axis in (("_quantized_keys", layer.axis_key), ("_quantized_values", layer.axis_value)):
                restored = layer._dequantize(getattr(layer, name)).index_select(0, index).contiguous()
                setattr(layer, name, layer._quantize(restored, axis=axis))
            if layer.keys.numel():
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.rows *= n


def stored_bytes(value) -> int:
    """Bytes of the tensors a cache entry holds: a tensor (a quantized tensor subclass counts its inner
    tensors), or tuples, lists and dicts of them; anything else holds none."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
            names, _ = value.__tensor_flatten__()
            return sum(stored_bytes(getattr(value, name)) for name in names)
        return tensor_bytes(value)
    if isinstance(value, (tuple, list)):
        return sum(stored_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(stored_bytes(v) for v in value.values())
    return 0


class TransformersLM:
    """A transformers causal LM seen through the engine's model protocol."""

    decode_compiles = True  # transformers' DynamicCache decode compiles once with dynamic shapes
    decodes_rows_apart = False  # a transformers cache is one batch at one position, not one cache per row

    def __init__(self, model):
        config = check_model(model)
        self.model = model.eval()
        self.config = TransformersLimits(config.max_position_embeddings, config.vocab_size, config.model_type)

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, batch_size: int = 1, *, capacity: int | None = None, pad: torch.Tensor | None = None,
                  dtype=None, device=None, compression=None, kv_bits=None):
        """An empty cache (a ``DynamicCache`` grows as it goes: ``capacity`` is not needed); with
        ``kv_bits``, transformers' own ``QuantizedCache`` (``TransformersQuantizedCache``)."""
        quantization = as_quantization(kv_bits)
        if quantization is not None and compression is not None:
            raise InputError("a transformers model's cache is compressed or quantized, not both")
        device = device or next(self.model.parameters()).device
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=device)
            pad = pad if int(pad.max()) > 0 else None
        if quantization is not None:
            return TransformersQuantizedCache(self.model.config, batch_size, pad, quantization)
        if compression is None:
            return TransformersCache(self.model.config, pad)
        # the policy builds its own transformers cache: the core never imports yoco.compress
        return compression.new_transformers_cache(self.model, batch_size, pad)

    def __call__(self, ids: torch.Tensor, cache, num_logits: int | None = None,
                 check_ids: bool = True) -> torch.Tensor | None:
        """``check_ids`` is the protocol's (the engine checks the prompts); transformers' embedding
        refuses an id outside the vocabulary itself."""
        B, T = ids.shape
        start = cache.seen
        if start + T > self.config.max_seq_len:
            raise InputError(f"sequence of {start + T} tokens is longer than the model's maximum "
                             f"max_position_embeddings={self.config.max_seq_len}")
        positions = torch.arange(start, start + T, device=ids.device)[None].expand(B, T)
        if cache.pad is not None:
            positions = (positions - cache.pad[:, None]).clamp_min(0)
        keep = T if num_logits is None else max(num_logits, 1)
        out = cache.run(self.model, ids, position_ids=positions, logits_to_keep=keep)
        return None if num_logits == 0 else out.logits


__all__ = ["QUANTIZED_BACKENDS", "SUPPORTED", "TransformersCache", "TransformersLM", "TransformersLimits",
           "TransformersQuantizedCache", "check_model", "stored_bytes"]
