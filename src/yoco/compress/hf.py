"""Compression policies on transformers causal LMs (Llama / Mistral / Qwen2 families), through the
public extension points of transformers 5.x only:

- ``CompressedCache``: a ``transformers.Cache`` whose layers (``CompressedLayer``, a
  ``CacheLayerMixin``) each hold a ``CompressedKV``; ``get_seq_length()`` is the true number of tokens
  seen, never the (smaller) number kept, so positions stay true after eviction;
- the attention implementation ``"yoco_compressed"`` (registered with ``AttentionInterface``): reads
  the layer's entries with a mask built from their slots (per row, per head, per layer: unequal
  PyramidKV lengths need nothing special), and lets the policy observe the queries. transformers builds
  no mask of its own for it (no mask function is registered), so nothing is sized from one layer.
  It finds the cache through ``compressed_attention(model, cache)``, a context manager that switches
  the model to it for the duration (a context variable: transformers' ``generate()`` refuses unknown
  keyword arguments, and the attention function never sees the cache). A sliding-window layer's
  store knows its window (``layer_windows``) and drops what left it after every call, so it never
  holds more than transformers' own sliding layer (plus the current token while decoding, see
  ``store.py``);
- ``CompressedCache.run``: how ``yoco.hf_runner.TransformersLM`` (the engine's runner of transformers
  models) calls the model on it, so yoco's engine (``generate``, chunked prefill, left-padded batches)
  runs a transformers model with a policy exactly as without one;
- ``generate(model, input_ids, policy, ...)``: transformers' own ``generate()`` (any decoding strategy,
  beam search included) on a compressed cache: a ``CompressedCache`` for these models, a compressed
  ``YocoCache`` for a ``YocoForCausalLM``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache import KVGeometry, map_rows
from ..engine import prefill
from ..hf import YocoCache, YocoForCausalLM, cache_arg, left_pad_counts
from ..hf_runner import check_model
from ..layers import RotaryEmbedding, Step, rotate_by
from ..models.base import InputError
from .store import CompressedKV

if TYPE_CHECKING:  # policies build these caches (Policy.new_transformers_cache)
    from .policies import Policy

ATTENTION = "yoco_compressed"


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's cache: a ``CompressedKV`` behind transformers' layer API."""

    is_sliding = False

    def __init__(self, store: CompressedKV):
        super().__init__()
        self.store = store
        self.is_initialized = True

    @property
    def keys(self):
        return self.store.k

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None; the store owns the tensors
        pass

    @property
    def values(self):
        return self.store.v

    @values.setter
    def values(self, value):
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store.append(key_states, value_states)
        return self.store.k, self.store.v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.entries + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same question, as transformers < 5.13 asks it
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store = map_rows(self.store, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store = map_rows(self.store, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


class CompressedCache(Cache):
    """A transformers cache whose every attention layer is compressed by ``policy``."""

    def __init__(self, model, policy: Policy, batch_size: int, pad: torch.Tensor | None = None):
        config = check_model(model)
        param = next(model.parameters())
        rotate = rerotation(model) if policy.needs_rotary else None
        n_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = [CompressedLayer(policy.new_store(KVGeometry(n_kv, head_dim, head_dim, rotate=rotate,
                                                              sliding_window=window),
                                                   layer=i, n_layers=n_layers, batch_size=batch_size,
                                                   dtype=param.dtype, device=param.device, pad=pad))
                  for i, window in enumerate(layer_windows(model))]
        super().__init__(layers=layers)
        self.compression = policy

    @property
    def seen(self) -> int:
        return self.layers[0].store.seen

    @property
    def pad(self) -> torch.Tensor | None:
        """The rows' left padding, as the stores hold it (it moves with them when beams are reordered)."""
        return self.layers[0].store.pad

    def compress(self) -> None:
        for layer in self.layers:
            layer.store.compress()

    def run(self, model, input_ids: torch.Tensor, **inputs):
        """``model``'s output over the next ``input_ids``, attending through this cache (no mask: each
        store masks by its entries' slots)."""
        with compressed_attention(model, self):
            return model(input_ids=input_ids, use_cache=True, **inputs, **cache_arg(self))

    def nbytes(self) -> int:
        return sum(layer.store.nbytes() for layer in self.layers)

    def index_bytes(self) -> int:
        return sum(layer.store.index_bytes() for layer in self.layers)

    def offloaded_bytes(self) -> int:
        return sum(layer.store.offloaded_bytes() for layer in self.layers if hasattr(layer.store, "offloaded_bytes"))


def layer_windows(model) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as its attention passes it to the
    attention function: Qwen2/Qwen3 keep it on the attention module (None on their full-attention
    layers, see ``max_window_layers``); Mistral passes its config's to every layer; Llama has none.
    ``attend_compressed`` checks it against what each call passes."""
    config = model.config
    every_layer = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return [getattr(layer.self_attn, "sliding_window", every_layer) for layer in model.model.layers]


def rerotation(model):
    """``rotate(keys, delta)`` for the model's RoPE (half-split pairs, its own frequencies)."""
    rotary_emb = model.model.rotary_emb
    if float(getattr(rotary_emb, "attention_scaling", 1.0)) != 1.0:
        raise InputError("re-rotating cached keys (StreamingLLM's sinks, InfLLM's memory) needs plain RoPE; "
                         "this model scales its RoPE "
                         f"({model.config.rope_parameters})")
    inv_freq = rotary_emb.inv_freq
    rotary = RotaryEmbedding(2 * inv_freq.numel()).to(inv_freq.device)
    rotary.inv_freq = inv_freq.float().clone()
    return lambda keys, delta: rotate_by(rotary, keys, delta)


ACTIVE_CACHE: ContextVar[CompressedCache | None] = ContextVar("yoco_compressed_cache", default=None)


def attend_compressed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      **kwargs):
    """The ``"yoco_compressed"`` attention: through the layer's ``CompressedKV`` of the cache made
    active by ``compressed_attention``, else plain SDPA."""
    cache = ACTIVE_CACHE.get()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    store = cache.layers[module.layer_idx].store
    if sliding_window != store.sliding_window:
        raise InputError(f"layer {module.layer_idx} attends with sliding window {sliding_window}, but its "
                         f"compressed cache was built for {store.sliding_window} (read from the model by "
                         "layer_windows)")
    T = query.shape[2]
    step = Step(store.seen - T, T, store.pad, query.device)
    out = store.attend(query, step, scale=scaling)
    store.forget_unseeable()  # the layer's only reader this call has read
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attend_compressed)


@contextmanager
def compressed_attention(model, cache: CompressedCache):
    """Within the block, ``model`` attends through ``cache`` (its attention implementation switched to
    ``"yoco_compressed"``); both are restored afterwards."""
    previous = model.config._attn_implementation
    token = ACTIVE_CACHE.set(cache)
    model.set_attn_implementation(ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        ACTIVE_CACHE.reset(token)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, policy: Policy, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int = 1024, **generate_kwargs):
    """transformers' ``model.generate(input_ids, ...)`` on a cache compressed by ``policy``: the prompt
    but its last token is prefilled and compressed (as a reused prefix cache), then ``generate()`` runs
    from the last prompt token with any of its options (sampling, beam search, ...). Returns what
    ``generate()`` returns; pass your own empty ``CompressedCache`` (for a ``YocoForCausalLM``: an empty
    ``YocoCache(model.model, compression=policy)``) as ``cache=`` (or ``past_key_values=``) to read it
    afterwards. A yoco model's prefill is yoco's engine's (``policy.prefill_plan`` in calls of at most
    ``prefill_chunk`` tokens), so YOCO's cross-decoder runs on the queries the policy scores."""
    B, T = input_ids.shape
    if T < 2:
        raise InputError("compressed generation needs a prompt of at least 2 tokens (all but the last are compressed)")
    pad = None
    if attention_mask is not None:
        pad = left_pad_counts(attention_mask)
        if bool((pad >= T - 1).any()):
            raise InputError("every row needs at least 2 real prompt tokens (all but the last are compressed)")
        pad = pad if int(pad.max()) > 0 else None
    given = [generate_kwargs.pop(name) for name in ("cache", "past_key_values") if name in generate_kwargs]
    cache = given[0] if given else None
    if isinstance(model, YocoForCausalLM):
        cache = yoco_cache(model, policy, cache)
        cache.start(B, pad, T - 1, input_ids.device)
        prefill(model.model, input_ids[:, :-1], cache.inner, prefill_chunk)  # and compresses
        return generate_on(model, cache, input_ids, attention_mask, generate_kwargs)
    if cache is None:
        cache = CompressedCache(model, policy, B, pad)
    elif not isinstance(cache, CompressedCache) or cache.seen or cache.compression is not policy or not (
            (cache.pad is None and pad is None) or (cache.pad is not None and pad is not None
                                                    and torch.equal(cache.pad.cpu(), pad.cpu()))):
        raise InputError("the cache passed must be an empty CompressedCache(model, policy, batch_size, pad) built "
                         "for this policy and the attention mask's left padding")
    positions = torch.arange(T - 1, device=input_ids.device).expand(B, T - 1)
    if pad is not None:
        positions = (positions - pad[:, None]).clamp_min(0)
    with compressed_attention(model, cache):
        model(input_ids=input_ids[:, :-1], position_ids=positions, use_cache=True, logits_to_keep=1,
              **cache_arg(cache))
        cache.compress()
        return generate_on(model, cache, input_ids, attention_mask, generate_kwargs)


def yoco_cache(model: YocoForCausalLM, policy: Policy, given) -> YocoCache:
    """The compressed ``YocoCache`` a yoco model generates on: ``given`` if it is an empty one built
    for ``policy``, a new one if None."""
    if given is None:
        return YocoCache(model.model, compression=policy)
    if not isinstance(given, YocoCache) or given.inner is not None or given.compression is not policy:
        raise InputError("the cache passed must be an empty YocoCache(model.model, compression=policy) built "
                         "for this policy")
    return given


def generate_on(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generate_kwargs: dict):
    """``model.generate`` from the last prompt token on a prefilled, compressed ``cache``."""
    # generate() repeats every row for its beams / returned sequences, but not a cache already filled
    config = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(generate_kwargs.get("num_beams", config.num_beams) or 1,
                 generate_kwargs.get("num_return_sequences", config.num_return_sequences) or 1)
    if expand > 1:
        cache.batch_repeat_interleave(expand)
    return model.generate(input_ids, attention_mask=attention_mask, **cache_arg(cache), **generate_kwargs)

