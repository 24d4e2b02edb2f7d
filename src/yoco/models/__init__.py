"""Architectures by name: ``build_model(config)`` or ``build_model("yoco-swa", preset="tiny")``."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, ModelConfig, get_config
from .base import CausalLM, InputError, weight_read_bytes
from .block_transformer import BlockTransformer
from .transformer import Transformer
from .yoco import SELF_DECODERS, YOCO

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "transformer": Transformer,
    **{arch: YOCO for arch in SELF_DECODERS},  # one per self-decoder mixer
    "block": BlockTransformer,
}


def model_class(arch: str) -> type[CausalLM]:
    """The model class of an architecture name; an unknown name is refused, never guessed."""
    if arch not in MODEL_CLASSES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[arch]


def build_model(config: ModelConfig | str, *, preset: str = "tiny", dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None, seed: int | None = None, **overrides: Any) -> CausalLM:
    """A freshly initialised model from a config, or from an architecture name and preset."""
    if isinstance(config, str):
        config = get_config(config, preset, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = model_class(config.arch)(config)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def with_positions(model: CausalLM, changes: dict[str, Any]) -> CausalLM:
    """``model`` with its global attention's position fields changed (``config.POSITION_FIELDS``: a
    training-free RoPE extension or a query temperature for an evaluation), the same weights; itself
    when there is nothing to change. The fields are validated (a bad combination raises ConfigError)."""
    if not changes:
        return model
    config = model.config.replace(**changes)
    parameter = next(model.parameters())
    changed = build_model(config, dtype=parameter.dtype, device=parameter.device)
    changed.load_state_dict(model.state_dict())  # positions hold no weights: every tensor carries over
    return changed.train(model.training)


# ---------------------------------------------------------------------- facts from a config
# What every command reports about an architecture, asked of its model class (which composes them from
# its mixers): nothing outside the models branches on architecture names.
def cache_bytes(config: ModelConfig, batch_size: int, context: int, dtype: torch.dtype) -> int:
    """Cache bytes of `batch_size` sequences of `context` positions, from the config alone."""
    return model_class(config.arch).cache_bytes_for(config, batch_size, context, dtype)


def cache_growth_per_token(config: ModelConfig, dtype: torch.dtype) -> float:
    """How many bytes one more token of context adds to one sequence's cache, on average over a span of
    whole blocks (the Block Transformer grows by one block-decoder entry per block_len tokens; windowed
    and recurrent caches stop growing: 0). The one growth figure every command reports."""
    span = 4096 * config.block_len
    return (cache_bytes(config, 1, 2 * span, dtype) - cache_bytes(config, 1, span, dtype)) / span


def prefill_flops(config: ModelConfig, n: int) -> float:
    """Useful FLOPs of a prefill of n tokens with logits for the last one only (``CausalLM.prefill_flops``)."""
    return model_class(config.arch).prefill_flops(config, n)


def quadratic_prefill(config: ModelConfig) -> bool:
    """Whether the architecture's prefill time grows with the square of the context."""
    return model_class(config.arch).quadratic_prefill(config)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use fp32 or bf16")
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    return DTYPES[dtype]


__all__ = ["BlockTransformer", "CausalLM", "InputError", "MODEL_CLASSES", "Transformer", "YOCO", "build_model", "cache_bytes",
           "cache_growth_per_token", "model_class", "prefill_flops", "quadratic_prefill", "resolve_dtype",
           "weight_read_bytes", "with_positions"]
