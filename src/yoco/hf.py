"""Hugging Face transformers integration: every yoco model as a transformers causal LM.

A thin layer over the library's own modules, registered with ``AutoConfig`` and
``AutoModelForCausalLM`` when ``yoco`` is imported (no ``trust_remote_code``):

- ``YocoConfig``: a ``PreTrainedConfig`` whose fields are exactly ``ModelConfig``'s (the usual HF
  names such as ``hidden_size`` map onto them), validated by ``ModelConfig``.
- ``YocoForCausalLM``: ``PreTrainedModel`` + ``GenerationMixin`` around the yoco model built by
  ``build_model`` (as ``.model``); its forward is the yoco forward.
- ``YocoCache``: a transformers ``Cache`` holding yoco's own ``ModelCache``, so ``generate`` keeps
  exactly the cache the architecture needs (one global K/V for YOCO, the latent for MLA, rings
  for sliding windows), allocated once for the prompt plus ``max_new_tokens``.

A yoco checkpoint folder (``save_model``, ``yoco train``, ``yoco init``) is already a transformers
folder: its ``config.json`` carries ``model_type: "yoco"`` and its weights load with or without
the ``model.`` prefix that ``save_pretrained`` writes.
"""

from __future__ import annotations

import dataclasses
import typing
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import ModelCache
from .config import ModelConfig
from .layers import RotaryEmbedding, Step
from .models import CausalLM, build_model
from .models.base import InputError
from .quantize import KVQuantization

MODEL_TYPE = "yoco"
# transformers 5.24 renamed the cache argument of ``forward`` / ``generate`` and the output field from
# ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40). Both renames came in one
# release, so the installed release's name is read once, from its output class; yoco passes and
# returns the cache under that name only, and its forward accepts either.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_arg(cache) -> dict:
    """``{name: cache}`` with the name the installed transformers uses for the cache argument."""
    return {CACHE_ARG: cache}


def output_cache(output):
    """The cache a transformers model output carries (under the installed release's field name)."""
    return getattr(output, CACHE_ARG)
# transformers' usual attribute names, read by generation, lm-eval and other tools.
HF_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
            "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim", "max_position_embeddings": "max_seq_len"}


def _config_namespace() -> dict:
    """YocoConfig's body: ModelConfig's fields, types and defaults (one source of truth)."""
    hints = typing.get_type_hints(ModelConfig)
    fields = dataclasses.fields(ModelConfig)
    # What transformers itself reads: weight tying, caching, and the tokens generation stops or pads at.
    hf_fields = {"tie_word_embeddings": (bool, False), "use_cache": (bool, True),
                 "eos_token_id": (typing.Optional[int], None), "pad_token_id": (typing.Optional[int], None)}
    return {"model_type": MODEL_TYPE, "attribute_map": dict(HF_NAMES),
            "__annotations__": {f.name: hints[f.name] for f in fields} | {k: t for k, (t, _) in hf_fields.items()},
            **{f.name: f.default for f in fields}, **{k: v for k, (_, v) in hf_fields.items()},
            "__module__": __name__, "__qualname__": "YocoConfig"}


class _YocoConfigMethods:
    def __post_init__(self, **kwargs):
        self.tie_word_embeddings = self.tie_embeddings  # transformers ties the LM head by this name
        super().__post_init__(**kwargs)
        self.to_model_config()  # a bad combination fails here, naming the field

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "YocoConfig":
        return cls(**config.to_dict(), **kwargs)


YocoConfig = type("YocoConfig", (_YocoConfigMethods, PreTrainedConfig), _config_namespace())
YocoConfig.__doc__ = "transformers configuration of any yoco architecture: ModelConfig's fields."


def quantization_from_cache_config(cache_config: dict | None) -> KVQuantization:
    """``generate(..., cache_implementation="quantized", cache_config={...})`` for a yoco model: transformers'
    ``QuantizedCache`` keys ``nbits``, ``q_group_size`` and ``residual_length`` (yoco's defaults 4, 32 and
    128) give yoco's own quantized cache (KIVI in plain PyTorch, ``yoco.quantize``), whatever ``backend``
    names; its axes are KIVI's (keys per channel, values per token), so other axes are refused."""
    config = dict(cache_config or {})
    config.pop("backend", None)
    config.pop("config", None)
    for key in ("axis_key", "axis_value"):
        if config.pop(key, None) is not None:
            raise ValueError(f"yoco's quantized cache quantizes keys per channel and values per token (KIVI); "
                             f"{key} cannot be chosen")
    nbits, group, residual = config.pop("nbits", 4), config.pop("q_group_size", 32), config.pop("residual_length", 128)
    if config:
        raise ValueError(f"unknown cache_config keys for a yoco model: {', '.join(sorted(config))} (it takes nbits, "
                         f"q_group_size, residual_length)")
    return KVQuantization(nbits, group, residual)


class YocoCache(Cache):
    """yoco's own inference cache behind the transformers ``Cache`` interface. The ``ModelCache`` is
    built at the first forward, when the batch and its left padding are known; ``capacity`` (prompt
    plus new tokens, known to ``generate``) makes growing caches allocate once; ``compression`` (a
    ``yoco.compress`` policy) makes its growing K/V caches compressed ones (``yoco.compress.hf.generate``
    prefills and compresses it)."""

    is_compileable = False

    def __init__(self, model: CausalLM, capacity: int | None = None, compression=None, kv_bits=None):
        super().__init__(layers=[])
        self.model_ref = [model]  # a list, so the cache does not become part of anything's state
        self.capacity = capacity
        self.compression = compression
        self.kv_bits = kv_bits  # yoco.quantize: its growing K/V caches quantized
        self.inner: ModelCache | None = None

    def start(self, batch_size: int, pad: torch.Tensor | None, length: int, device) -> None:
        model = self.model_ref[0]
        capacity = None if self.capacity is None else min(self.capacity, model.config.max_seq_len)
        capacity = None if capacity is not None and capacity < length else capacity
        self.inner = model.new_cache(batch_size, capacity=capacity, pad=pad, device=device,
                                     compression=self.compression, kv_bits=self.kv_bits)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.inner is None else self.inner.seen

    @property
    def is_linear(self) -> list[bool]:
        # generate() skips the prompt tokens a passed-in cache already holds unless every layer is a
        # linear-attention one; with no transformers layers here, all([]) would say so. yoco's cache
        # holds the tokens seen (get_seq_length) whatever its kinds, so a prefilled one is continued.
        return [False]

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.inner is None else self.inner.nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.inner is not None:
            self.inner = self.inner.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.inner is not None:
            self.inner = self.inner.repeat(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("yoco caches cannot be cropped (sliding-window rings and retention states "
                                  "forget): assisted and speculative decoding are not supported")

    def __len__(self) -> int:
        return 0 if self.inner is None else len(self.inner)

    def __repr__(self) -> str:
        return f"YocoCache(seen={self.get_seq_length()}, bytes={self.nbytes()})"


def left_pad_counts(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's count of leading zeros; refuses masks with holes or right padding."""
    mask = attention_mask.to(torch.long)
    pad = (mask.cumsum(-1) == 0).sum(-1)
    ones = torch.arange(mask.shape[1], device=mask.device)[None, :] >= pad[:, None]
    if not torch.equal(mask.bool(), ones):
        raise InputError("only left padding is supported: every attention_mask row must be zeros then ones "
                         "(pass padding_side='left' to the tokenizer)")
    if bool((pad == mask.shape[1]).any()):
        raise InputError("an attention_mask row is all zeros: every row needs at least one real token")
    return pad


def check_positions(position_ids: torch.Tensor | None, start: int, pad: torch.Tensor | None,
                    input_ids: torch.Tensor) -> None:
    """yoco places tokens by the cache and the left padding; ``position_ids`` (which transformers'
    generation passes) must agree with that on every real token, or the call is refused rather than
    silently computed at other positions."""
    if position_ids is None:
        return
    B, T = input_ids.shape
    given = torch.as_tensor(position_ids, device=input_ids.device)
    if given.dim() != 2 or given.shape[-1] != T or given.shape[0] not in (1, B):
        raise InputError(f"position_ids must have shape [batch, {T}], got {tuple(given.shape)}")
    # The model's own placement rule (Step), so the check cannot drift from what the model computes.
    step = Step(start, T, None if pad is None else pad.to(input_ids.device), input_ids.device)
    expected = step.positions.expand(B, T)
    real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if step.pad is None else ~step.pad_mask()
    if not torch.equal(given.expand(B, T)[real], expected[real]):
        raise InputError("position_ids disagree with the positions yoco derives from the cache and the left "
                         "padding (first real token = 0); other positions are not supported")


class YocoForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = YocoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules = ["Block"]
    # gradient_checkpointing_enable() (5.x: activation_checkpointing_enable()) sets each Block's own
    # ``gradient_checkpointing`` flag and function: yoco's activation checkpointing
    supports_gradient_checkpointing = True

    def __init__(self, config: YocoConfig):
        super().__init__(config)
        self.model = build_model(config.to_model_config())
        self.post_init()

    # ------------------------------------------------------------------ transformers plumbing
    def _init_weights(self, module) -> None:
        # transformers builds models on the meta device and loads weights into them; what no file
        # holds is made here: RoPE frequencies (non-persistent) and, for a fresh model, yoco's init.
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()
        elif isinstance(module, CausalLM) and not getattr(module, "_is_hf_initialized", False):
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.init_weights()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def from_yoco(cls, model: CausalLM) -> "YocoForCausalLM":
        """Wrap an existing yoco model (sharing its weights)."""
        wrapped = cls(YocoConfig.from_model_config(model.config))
        wrapped.model = model
        return wrapped

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        if model_kwargs.get(CACHE_ARG) is None and generation_config.use_cache is not False:
            kv_bits = None
            if generation_config.cache_implementation == "quantized":
                kv_bits = quantization_from_cache_config(generation_config.cache_config)
            elif generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(f"yoco models build their own cache: cache_implementation "
                                 f"{generation_config.cache_implementation!r} is not one of None, 'dynamic', 'quantized'")
            model_kwargs[CACHE_ARG] = YocoCache(self.model, capacity=max_cache_length, kv_bits=kv_bits)
        else:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                  max_cache_length, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, past_key_values: Cache | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """The yoco forward. Positions come from the left padding (``attention_mask``) and the cache;
        ``position_ids``, if given, must agree with them (checked); with a cache, ``input_ids`` are the
        tokens after those already cached. The cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier releases). ``logits_to_keep=k`` computes only the last k positions'
        logits (YOCO then also skips its cross-decoder for the others). ``output_hidden_states`` gives
        the embeddings and every block's output (the last one normed, as transformers models do) at
        every position of the call; ``output_attentions`` is refused (no attention weights are formed)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise InputError("pass the cache once: as cache= or as past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise InputError("output_attentions is not supported: yoco's attention runs in fused kernels "
                             "(scaled_dot_product_attention) that never form the weights, and gated retention "
                             "has none")
        blocks, hidden_states = None, None
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            blocks, hidden_states = self.model.residual_blocks(), []  # (refused here by a model that has none)
        if inputs_embeds is not None:
            raise InputError("yoco models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise InputError("input_ids are required")
        # use_cache=None keeps a cache only when one is passed in: a plain forward (training, scoring)
        # builds none.
        use_cache = cache is not None if use_cache is None else use_cache
        num_logits = None if not logits_to_keep else min(int(logits_to_keep), input_ids.shape[1])
        # hidden states exist at every position only if every position runs through every block
        model_logits = num_logits if hidden_states is None else None
        if cache is not None and not isinstance(cache, YocoCache):
            if cache.get_seq_length() != 0:
                raise InputError(f"yoco models keep their own cache kind; got a filled {type(cache).__name__}")
            cache = None  # an empty default cache (e.g. created by a caller): use yoco's own
        if cache is None and use_cache:
            cache = YocoCache(self.model)
        if cache is None:
            pad = None if attention_mask is None else left_pad_counts(attention_mask)
            check_positions(position_ids, 0, pad, input_ids)
            with recording(blocks, hidden_states):
                logits = self.model(input_ids, pad=pad, num_logits=model_logits)
        else:
            if cache.inner is None:  # prefill: the prompt's padding fixes each row's positions
                pad = None if attention_mask is None else left_pad_counts(attention_mask)
                check_positions(position_ids, 0, pad, input_ids)
                cache.start(input_ids.shape[0], pad, input_ids.shape[1], input_ids.device)
            else:
                if attention_mask is not None and not bool(attention_mask[:, -input_ids.shape[1]:].all()):
                    raise InputError("tokens after the prompt cannot be padding (attention_mask must be 1 for them)")
                pad = cache.inner.pad
                check_positions(position_ids, cache.get_seq_length(), pad, input_ids)
            with recording(blocks, hidden_states):
                logits = self.model(input_ids, cache.inner, num_logits=model_logits)
        if model_logits != num_logits:
            logits = logits[:, -num_logits:]
        loss = None
        if labels is not None:
            if num_logits is not None:
                raise InputError("labels need every position's logits (logits_to_keep=0)")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if hidden_states is not None:
            hidden_states[-1] = self.model.norm(hidden_states[-1])
            hidden_states = tuple(hidden_states)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states,
                                      **cache_arg(cache if use_cache else None))


@contextmanager
def recording(blocks: list | None, hidden_states: list | None):
    """Within the block, a forward through ``blocks`` (a model's ``residual_blocks()``) appends its
    hidden states to ``hidden_states``: the input of the first block, then every block's output (hooks,
    so the model code stays as it is). With None, nothing is recorded."""
    if blocks is None:
        yield
        return
    hooks = [blocks[0].register_forward_pre_hook(lambda module, args: hidden_states.append(args[0]))]
    hooks += [block.register_forward_hook(lambda module, args, out: hidden_states.append(out)) for block in blocks]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know yoco folders (done on ``import yoco``)."""
    try:
        AutoConfig.register(MODEL_TYPE, YocoConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(YocoConfig, YocoForCausalLM)
    except ValueError:
        pass


__all__ = ["CACHE_ARG", "YocoCache", "YocoConfig", "YocoForCausalLM", "cache_arg", "left_pad_counts", "output_cache",
           "register"]
