"""What each architecture says of itself from a config alone (cache bytes, prefill FLOPs, whether its
prefill is quadratic), composed from its mixers' own facts; unknown names and kinds are refused."""

import pytest
import torch

from yoco.config import ARCHITECTURES, NAMES, PRESET_USE, ConfigError, get_config
from yoco.layers import RotaryEmbedding
from yoco.mixers.attention import CausalSelfAttention
from yoco.mixers.cross_attention import CrossAttention, GlobalKV
from yoco.mixers.mla import MultiHeadLatentAttention
from yoco.mixers.retention import GatedRetention
from yoco.mixers.sliding_window import SlidingWindowAttention
from yoco.models import (MODEL_CLASSES, YOCO, Transformer, build_model, cache_bytes, cache_growth_per_token,
                         model_class, prefill_flops, quadratic_prefill)

# Whose prefill time grows with the square of the context: full attention over tokens. Windowed and
# recurrent self-decoders are linear; the Block Transformer attends over blocks (see its quadratic_prefill).
QUADRATIC = {"transformer": True, "mha": True, "gqa": True, "mqa": True, "mla": True, "cla2": True, "mqa-cla2": True,
             "mlkv": True, "swa": False, "yoco-swa": False, "yoco-gret": False, "yoco-gdn": False,
             "block": False}


def test_the_names_cover_every_registered_architecture():
    assert set(QUADRATIC) == set(NAMES)
    assert {get_config(name).arch for name in NAMES} == set(MODEL_CLASSES) == set(ARCHITECTURES) == set(PRESET_USE)


@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_answers_all_three_facts(name):
    config = get_config(name, "tiny")
    model = build_model(config)
    for context in (1, 40, 333):
        assert cache_bytes(config, 2, context, torch.float32) == model.new_cache(2, capacity=context).nbytes() > 0
    assert cache_growth_per_token(config, torch.float32) >= 0
    flops = [prefill_flops(config, k * 256) for k in (1, 2, 3)]
    assert 0 < flops[0] < flops[1] < flops[2]
    assert quadratic_prefill(config) is QUADRATIC[name]
    if QUADRATIC[name]:
        assert flops[2] - flops[1] > 1.05 * (flops[1] - flops[0])
    elif name != "block":
        assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0])  # past the window: linear


def mixers(config):
    rotary = RotaryEmbedding(config.head_dim)
    return [(CausalSelfAttention(config, rotary), {}), (SlidingWindowAttention(config, rotary, config.window), {}),
            (GlobalKV(config, rotary), {}),
            (GatedRetention(config, RotaryEmbedding(config.dim // config.n_retention_heads)), {}),
            (MultiHeadLatentAttention(config, RotaryEmbedding(config.mla_rope_dim)), {})]


def test_each_mixer_says_its_own_cache_bytes():
    config = get_config("yoco-swa", "tiny")  # a window, and retention heads by default
    for mixer, role in mixers(config):
        for context in (1, 9, 50):
            cache = mixer.new_cache(3, dtype=torch.bfloat16, device=None, capacity=context)
            per_row = type(mixer).cache_bytes_per_row(config, context, torch.bfloat16, **role)
            assert cache.nbytes() == 3 * per_row, type(mixer).__name__
    assert CrossAttention.cache_bytes_per_row(config, 50, torch.float32) == 0  # it reads GlobalKV's
    assert CausalSelfAttention.cache_bytes_per_row(config, 50, torch.float32, produces_kv=False) == 0


def test_cross_attention_of_the_last_query_sees_every_key():
    config = get_config("yoco-swa", "tiny")
    whole = CrossAttention.prefill_flops(config, 10)
    last = CrossAttention.prefill_flops(config, 10, queries=1)
    first_nine = CrossAttention.prefill_flops(config, 9)
    assert whole == pytest.approx(first_nine + last)
    assert last == 2 * 2 * config.dim * config.dim + 4 * config.dim * 10


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="unknown architecture 'mamba'"):
        model_class("mamba")
    config = get_config("transformer", "tiny")
    config.arch = "mamba"  # as if a config got past validation
    for ask in (lambda: build_model(config), lambda: cache_bytes(config, 1, 8, torch.float32),
                lambda: prefill_flops(config, 8), lambda: quadratic_prefill(config),
                lambda: cache_growth_per_token(config, torch.float32)):
        with pytest.raises(ConfigError, match="unknown architecture 'mamba'"):
            ask()


def test_an_unknown_yoco_self_decoder_is_refused_not_counted_as_retention(monkeypatch):
    """A YOCO architecture registered without a self-decoder kind is refused in building, bytes and
    FLOPs (it used to be built, counted and benchmarked as gated retention)."""
    config = get_config("yoco-gret", "tiny")
    config.arch = "yoco-mamba"
    monkeypatch.setitem(MODEL_CLASSES, "yoco-mamba", YOCO)
    for ask in (lambda: YOCO(config), lambda: build_model(config), lambda: cache_bytes(config, 1, 8, torch.float32),
                lambda: YOCO.cache_bytes_for(config, 1, 8, torch.float32), lambda: prefill_flops(config, 8),
                lambda: quadratic_prefill(config)):
        with pytest.raises(ConfigError, match="unknown YOCO self-decoder for arch 'yoco-mamba'"):
            ask()


def test_an_unknown_transformer_attention_is_refused():
    config = get_config("transformer", "tiny")
    config.attention = "linear"
    for ask in (lambda: Transformer(config), lambda: prefill_flops(config, 8),
                lambda: cache_bytes(config, 1, 8, torch.float32)):
        with pytest.raises(ConfigError, match="unknown Transformer attention 'linear'"):
            ask()
