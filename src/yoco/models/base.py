"""What every yoco language model shares: embeddings, the LM head, input checks, weight init.

A model's ``forward(ids, cache=None, pad=None, num_logits=None, check_ids=True)``:

- without a cache it is the full (training) forward over ``ids``;
- with a cache it processes ``ids`` as the next tokens after the ``cache.seen`` already processed
  and updates the cache (chunked prefill and decode are both this call);
- ``num_logits`` is how many final positions get logits: None for all, 0 for none (a prefill chunk
  whose logits nobody reads), k for the last k. YOCO also skips its cross-decoder for positions
  without logits, which is what makes its prefill O(N);
- ``check_ids=False`` skips the check that every id is in the vocabulary, the one check that reads
  tensor values (a host synchronisation): the engine passes it for the tokens it sampled itself, so
  that a decode step reads no tensor value anywhere (and ``torch.compile`` can capture it whole).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import ModelCache
from ..config import ModelConfig
from ..errors import YocoError
from ..layers import Linear, RMSNorm, Step, SwiGLU
from ..quantize import QuantizedKV, as_quantization

# Projections that write into the residual stream get a depth-scaled init (GPT-2 / Megatron).
RESIDUAL_OUTPUTS = ("o_proj", "out_proj", "down_proj")


class InputError(YocoError, ValueError):
    """Bad input to a model or the engine; the message names the problem."""


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary 0..vocab_size-1 (reads the ids: a host synchronisation)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"token id {lo if lo < 0 else hi} outside the vocabulary 0..{vocab_size - 1}")


class Block(nn.Module):
    """Pre-norm residual block: ``x += mixer(norm(x), ...); x += ffn(norm(x))``.

    Activation checkpointing (``gradient_checkpointing``, the attribute transformers'
    ``gradient_checkpointing_enable`` sets on every module that has it): a training forward keeps only
    the block's input and recomputes the rest during backward. Only a call without a cache is
    checkpointed (its step says so: ``Step.cache_free``), since recomputing would write a cache twice."""

    gradient_checkpointing = False
    _gradient_checkpointing_func = staticmethod(functools.partial(checkpoint, use_reentrant=False))

    def __init__(self, mixer: nn.Module, config: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = SwiGLU(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, *mixer_args, **mixer_kwargs) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and mixer_args[0].cache_free:
            return self._gradient_checkpointing_func(self._forward, x, *mixer_args, **mixer_kwargs)
        return self._forward(x, *mixer_args, **mixer_kwargs)

    def _forward(self, x: torch.Tensor, *mixer_args, **mixer_kwargs) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), *mixer_args, **mixer_kwargs)
        return x + self.ffn(self.ffn_norm(x))


class CausalLM(nn.Module):
    # Whether torch.compile captures the decode step once for every slot (the engine's ``compile``).
    decode_compiles = True
    # Whether a call decodes one-row caches at different positions together (``cache.RowBatch``): every
    # mixer reaches its cache through the cache protocol, so each row attends its own.
    decodes_rows_apart = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = cfg.init_std
                if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS:
                    std /= math.sqrt(2 * cfg.n_layers)
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        # The YOCO reference multiplies embeddings by sqrt(dim) and draws them with std dim^-0.5.
        nn.init.normal_(self.embed.weight, std=cfg.dim ** -0.5 if cfg.scale_embeddings else cfg.init_std)

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block's activations in training forwards (``Block``): memory for one block's
        activations instead of every layer's, for about one more forward of compute."""
        for module in self.modules():
            if isinstance(module, Block):
                module.gradient_checkpointing = enable

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ shared pieces of forward
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.dim)
        return x

    def logits(self, x: torch.Tensor, num_logits: int | None) -> torch.Tensor | None:
        if num_logits == 0:
            return None
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(self.norm(x))

    def begin(self, ids: torch.Tensor, cache: ModelCache | None, pad: torch.Tensor | None,
              num_logits: int | None, check_ids: bool = True) -> Step:
        """Check the call and place its tokens; raises InputError naming any problem. Every check but
        the vocabulary's (``check_ids``) reads only shapes, dtypes and ints."""
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"token ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise InputError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise InputError(f"token ids must have shape [batch, length], got {tuple(ids.shape)}")
        B, T = ids.shape
        if B == 0 or T == 0:
            raise InputError(f"empty input: token ids have shape {tuple(ids.shape)}")
        if num_logits is not None and not 0 <= num_logits <= T:
            raise InputError(f"num_logits={num_logits} must be within 0..{T} (the tokens in this call)")
        if check_ids:
            check_token_ids(ids, self.config.vocab_size)
        start = 0
        if cache is not None:
            if pad is not None:
                raise InputError("pass left padding when creating the cache (new_cache(pad=...)), not per call")
            if cache.batch_size != B:
                raise InputError(f"cache was built for batch size {cache.batch_size}, got {B} rows")
            start, pad = cache.seen, cache.pad
        elif pad is not None:
            pad = self.check_pad(pad, B, T)
        if start + T > self.config.max_seq_len:
            raise InputError(f"sequence of {start + T} tokens is longer than the model's maximum "
                             f"max_seq_len={self.config.max_seq_len}")
        return Step(start, T, pad, ids.device, cache_free=cache is None)

    @staticmethod
    def check_pad(pad: torch.Tensor, batch_size: int, length: int) -> torch.Tensor | None:
        pad = torch.as_tensor(pad, dtype=torch.long)
        if pad.shape != (batch_size,):
            raise InputError(f"pad must hold one left-pad count per row ({batch_size}), got shape {tuple(pad.shape)}")
        if int(pad.min()) < 0 or int(pad.max()) >= length:
            raise InputError(f"pad counts must be within 0..{length - 1} (each row needs a real token)")
        return pad if int(pad.max()) > 0 else None

    # ------------------------------------------------------------------ caches
    def new_cache(self, batch_size: int = 1, *, capacity: int | None = None, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, device=None, compression=None, kv_bits=None) -> ModelCache:
        """An empty inference cache. ``capacity`` is the total slots (prompt + new tokens) if known:
        caches that grow with context are then allocated once at that size. ``compression`` (a
        ``yoco.compress`` policy) makes every growing K/V cache a compressed one (YOCO: its global K/V;
        the Transformer family: each producing layer's K/V or MLA latent): each such mixer describes
        what it caches (``kv_geometry()``) and the policy builds the store for it (``new_store``).
        ``kv_bits`` (2, 4, 8 or a ``yoco.quantize.KVQuantization``) stores those same caches quantized
        (``QuantizedKV``); fixed-size caches (sliding-window rings, retention states) stay as they are."""
        dtype, device, pad = self.cache_context(batch_size, capacity, pad, dtype, device)
        quantization = as_quantization(kv_bits)
        owners = self.cache_owners()
        if compression is None and quantization is None:
            layers = [m.new_cache(batch_size, dtype=dtype, device=device, capacity=capacity) for m in owners]
            return ModelCache(layers, batch_size, pad)
        targets = [i for i, m in enumerate(owners) if hasattr(m, "kv_geometry")]
        if not targets:
            what = "compress" if compression is not None else "quantize"
            raise InputError(f"{self.config.arch} with these settings has no growing K/V cache to {what} "
                             f"(its caches are {', '.join(sorted({type(m).__name__ for m in owners}))})")
        if compression is not None and quantization is not None and compression.keeps_budget_while_decoding:
            raise InputError(f"{type(compression).__name__} evicts while decoding; kv_bits composes with the policies "
                             f"that compress the prompt once (SnapKV, PyramidKV, AdaKV), which quantize what they keep")

        def store(i: int, geometry):
            """The growing cache of owner i: the policy's store (quantizing what it keeps, if asked), or
            the quantized cache."""
            if compression is None:
                return QuantizedKV(geometry, quantization, batch_size, dtype=dtype, device=device, capacity=capacity,
                                   pad=pad)
            options = {} if quantization is None else {"quantization": quantization}  # (InfLLM's store takes none)
            return compression.new_store(geometry, layer=targets.index(i), n_layers=len(targets), batch_size=batch_size,
                                         dtype=dtype, device=device, pad=pad, **options)

        layers = [store(i, m.kv_geometry()) if i in targets
                  else m.new_cache(batch_size, dtype=dtype, device=device, capacity=capacity)
                  for i, m in enumerate(owners)]
        return ModelCache(layers, batch_size, pad, compression)

    def cache_context(self, batch_size: int, capacity: int | None, pad, dtype, device):
        """Checked (dtype, device, pad) for a new cache: the parameters' dtype and device by default."""
        param = next(self.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        if capacity is not None and capacity > self.config.max_seq_len:
            raise InputError(f"cache capacity {capacity} exceeds max_seq_len={self.config.max_seq_len}")
        if pad is not None:
            pad = self.check_pad(pad, batch_size, capacity or self.config.max_seq_len)
            pad = pad.to(device) if pad is not None else None
        return dtype, device, pad

    def cache_owners(self) -> list[nn.Module]:
        """The mixers that own a cache, in the order ``ModelCache.layers`` holds them."""
        raise NotImplementedError

    def residual_blocks(self) -> list[Block]:
        """The blocks that carry one residual vector per token from the embeddings to the LM head, in
        order: their inputs and outputs are the model's hidden states (transformers'
        ``output_hidden_states``)."""
        raise InputError(f"{self.config.arch} has no hidden state per token and layer")

    def cache_bytes_formula(self, batch_size: int, context: int, dtype: torch.dtype, kv_bits=None) -> int:
        """What ``new_cache(batch_size, capacity=context, kv_bits=kv_bits).nbytes()`` must be, from the
        config (and, quantized, each growing cache's geometry and the quantization's own formula)."""
        quantization = as_quantization(kv_bits)
        if quantization is None:
            return self.cache_bytes_for(self.config, batch_size, context, dtype)
        return batch_size * sum(self.owner_bytes_per_row(m, context, dtype, quantization) for m in self.cache_owners())

    def owner_bytes_per_row(self, owner: nn.Module, context: int, dtype: torch.dtype, quantization=None) -> int:
        """Bytes one cache owner's cache holds per row at ``context`` positions (quantized, if asked: a
        growing K/V cache by the quantization's formula; fixed-size caches stay as they are)."""
        if quantization is not None and hasattr(owner, "kv_geometry"):
            return QuantizedKV.bytes_per_row(owner.kv_geometry(), quantization, context, dtype)
        return type(owner).cache_bytes_per_row(self.config, context, dtype)

    def cache_readers(self) -> list[int]:
        """How many layers attend to each cache owner's cache in a decode step (``cache_owners`` order):
        one each, unless layers share a cache (YOCO's cross-decoder, CLA, MLKV)."""
        return [1] * len(self.cache_owners())

    def decode_read_bytes(self, context: int, dtype: torch.dtype | None = None, kv_bits=None) -> int:
        """The bytes one decode step of one sequence at ``context`` positions must read from memory at
        least: every weight once (of an embedding table looked up and not shared with the LM head, one
        row) and each cache once per layer that attends to it. Decode at batch 1 is bound by this
        traffic, so tokens/s times it is the memory bandwidth decode achieves."""
        dtype = dtype or next(self.parameters()).dtype
        return weight_read_bytes(self, dtype) + self.cache_read_bytes(context, dtype, as_quantization(kv_bits))

    def cache_read_bytes(self, context: int, dtype: torch.dtype, quantization=None) -> int:
        """The cache part of ``decode_read_bytes``: each owner's cache times the layers reading it."""
        return sum(readers * self.owner_bytes_per_row(m, context, dtype, quantization)
                   for m, readers in zip(self.cache_owners(), self.cache_readers()))

    # ------------------------------------------------------------------ facts from a config
    # Each architecture composes these from its mixers' own (``cache_bytes_per_row``, ``prefill_flops``,
    # ``quadratic_prefill`` of every mixer class), so nothing else needs to know what it is made of.
    @classmethod
    def cache_bytes_for(cls, config: ModelConfig, batch_size: int, context: int, dtype: torch.dtype) -> int:
        """Cache bytes of ``batch_size`` sequences of ``context`` positions."""
        return batch_size * cls.cache_bytes_per_row(config, context, dtype)

    @classmethod
    def cache_bytes_per_row(cls, config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Cache bytes of one sequence of ``context`` positions (what ``new_cache(1, capacity=context)``
        allocates)."""
        raise NotImplementedError

    @classmethod
    def prefill_flops(cls, config: ModelConfig, n: int) -> float:
        """Useful FLOPs of a prefill of n tokens with logits for the last one only: matmuls count 2 per
        multiply-add; attention counts QK^T and AV over the keys each query may see (masked-out work is
        not useful); the LM head runs for one token."""
        raise NotImplementedError

    @classmethod
    def quadratic_prefill(cls, config: ModelConfig) -> bool:
        """Whether prefill time grows with the square of the context (attention over every earlier token)."""
        raise NotImplementedError


def weight_read_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s weights (in ``dtype``) a decode step reads: all of them, but of an embedding
    table that no linear layer shares (an untied one) only the row looked up. Any ``nn.Module`` (a
    transformers model too)."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    unread = sum(m.weight.numel() - m.weight.shape[1] for m in model.modules()
                 if isinstance(m, nn.Embedding) and id(m.weight) not in shared)
    parameters = {id(p): p.numel() for p in model.parameters()}  # shared ones once
    return (sum(parameters.values()) - unread) * dtype.itemsize


def ffn_flops(config: ModelConfig, n: float) -> float:
    """FLOPs of a block's SwiGLU over n positions (gate, up and down projections)."""
    return 2 * 3 * config.dim * config.ffn_dim * n


def lm_head_flops(config: ModelConfig) -> float:
    """FLOPs of the LM head for the one position whose logits a prefill returns."""
    return 2 * config.dim * config.vocab_size
