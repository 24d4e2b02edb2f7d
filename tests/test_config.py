"""ModelConfig validation, presets and (de)serialisation."""

from __future__ import annotations

import json
import re

import pytest

from yoco.config import ARCH_OWN_FIELDS, ARCHITECTURES, PRESETS, ConfigError, ModelConfig, get_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_preset_and_arch_builds(arch, preset):
    cfg = get_config(arch, preset)
    assert isinstance(cfg, ModelConfig)
    assert cfg.arch == arch
    cfg.validate()  # idempotent, must not raise
    assert cfg.dim % cfg.n_heads == 0
    assert cfg.n_heads % cfg.n_kv_heads == 0
    assert cfg.head_dim % 2 == 0
    if arch in ("transformer", "block"):
        assert cfg.window is None
        assert cfg.self_layers == 0
        assert cfg.retention_heads is None
    else:
        assert cfg.is_yoco
        assert 1 <= cfg.self_layers <= cfg.n_layers - 1
        assert (cfg.rope_freqs, cfg.rope_pairs) == ("linspace", "interleaved")
    if arch == "yoco-swa":
        assert cfg.window is not None and cfg.window >= 1
    if arch == "yoco-gret":
        assert cfg.window is None
        assert cfg.dim % cfg.n_retention_heads == 0
    if arch == "yoco-gdn":
        assert cfg.window is None and cfg.retention_heads is None
        assert cfg.n_deltanet_heads * cfg.deltanet_key_dim == 3 * cfg.dim // 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_40m_preset_dimensions(arch):
    cfg = get_config(arch, "40m")
    assert cfg.dim == 512
    assert cfg.n_layers == 12
    assert cfg.n_heads == 8
    assert cfg.n_kv_heads == 2
    assert cfg.ffn_dim == 1408
    assert cfg.vocab_size == 4096
    assert cfg.head_dim == 64


def test_get_config_overrides_and_unknowns():
    cfg = get_config("yoco-swa", "tiny", window=5, n_self_layers=1)
    assert cfg.window == 5 and cfg.self_layers == 1
    with pytest.raises(ConfigError, match="preset"):
        get_config("transformer", "no-such-preset")
    with pytest.raises(ConfigError, match="architecture"):
        get_config("mamba", "tiny")


def test_window_only_control_variant():
    for preset in PRESETS:
        cfg = get_config("swa", preset)
        assert cfg.arch == "transformer" and cfg.window == PRESETS[preset]["window"]
        assert get_config("swa", preset, window=7).window == 7
    assert get_config("gqa", "small").window is None


def test_self_layers_default_is_half():
    assert get_config("yoco-swa", "tiny").self_layers == 2
    assert get_config("yoco-gret", "40m").self_layers == 6
    assert get_config("yoco-gret", "tiny").n_retention_heads == 2
    # default retention heads: dim // 256, at least 1
    assert ModelConfig(arch="yoco-gret", dim=512, n_heads=8, n_kv_heads=2).n_retention_heads == 2
    assert ModelConfig(arch="yoco-gret", dim=64, n_heads=4, n_kv_heads=2).n_retention_heads == 1


TINY = {name: value for name, value in PRESETS["tiny"].items() if name not in ARCH_OWN_FIELDS}


def _cfg(**changes):
    return ModelConfig(**{**TINY, **changes})


INVALID = [
    # (changes, field named in the message)
    (dict(n_heads=5), "n_heads"),  # 64 % 5 != 0
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(arch="yoco-swa", window=0), "window"),
    (dict(arch="yoco-swa", window=-3), "window"),
    (dict(arch="yoco-swa", window=None), "window"),
    (dict(arch="yoco-swa", window=8, n_self_layers=0), "n_self_layers"),
    (dict(arch="yoco-swa", window=8, n_self_layers=4), "n_self_layers"),  # == n_layers
    (dict(arch="yoco-gret", n_self_layers=0), "n_self_layers"),
    (dict(arch="yoco-gret", n_self_layers=4), "n_self_layers"),
    (dict(arch="transformer", n_self_layers=2), "n_self_layers"),
    (dict(arch="gpt"), "arch"),
    (dict(rope_freqs="ntk"), "rope_freqs"),
    (dict(rope_pairs="diagonal"), "rope_pairs"),
    (dict(arch="yoco-gret", retention_heads=3), "retention_heads"),  # 64 % 3 != 0
    (dict(arch="yoco-gret", retention_heads=0), "retention_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(dim=0), "dim"),
    (dict(dim=-64), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(ffn_dim=0), "ffn_dim"),
    (dict(n_heads=8, n_kv_heads=2, dim=8), "n_heads"),  # head dim 1 is odd -> RoPE
    (dict(arch="yoco-gret", window=8), "window"),
    (dict(arch="transformer", retention_heads=2), "retention_heads"),
    (dict(arch="yoco-gdn", retention_heads=2), "retention_heads"),
    (dict(arch="yoco-gret", deltanet_heads=2), "deltanet_heads"),
    (dict(arch="yoco-gdn", deltanet_heads=5), "deltanet_heads"),  # 48 keys % 5
    (dict(arch="yoco-gdn", deltanet_heads=0), "deltanet_heads"),
    (dict(arch="yoco-gdn", window=8), "window"),
    (dict(arch="yoco-gdn", deltanet_chunk=0), "deltanet_chunk"),
    (dict(arch="yoco-gdn", deltanet_conv=1), "deltanet_conv"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=0.0), "norm_eps"),
    # how the global attention sees positions
    (dict(global_position="alibi"), "global_position"),
    (dict(rope_extension="linear", rope_factor=2.0), "rope_extension"),
    (dict(rope_extension="pi"), "rope_factor"),  # a factor of 1 extends nothing
    (dict(rope_extension="ntk", rope_factor=0.5), "rope_factor"),
    (dict(rope_factor=4.0), "rope_factor"),  # without an extension
    (dict(rope_extension="yarn", rope_factor=4.0), "rope_original_len"),
    (dict(rope_extension="yarn", rope_factor=4.0, rope_original_len=64, yarn_beta_slow=40.0), "yarn_beta_slow"),
    (dict(rope_extension="pi", rope_factor=2.0, rope_original_len=64), "rope_original_len"),
    (dict(global_position="nope", rope_extension="pi", rope_factor=2.0), "rope_extension"),
    (dict(attn_temperature="sqrt"), "attn_temperature"),
    (dict(attn_temperature="log"), "attn_train_len"),
    (dict(attn_temperature="log", attn_train_len=1), "attn_train_len"),
    (dict(attn_train_len=1024), "attn_train_len"),  # without the log temperature
    (dict(attn_temperature="llama4", attn_scale=0.0), "attn_scale"),
    (dict(attn_temperature="llama4", attn_floor_scale=0), "attn_floor_scale"),
    (dict(attention="mla", global_position="nope"), "global_position"),
    (dict(arch="block", attn_temperature="llama4"), "attn_temperature"),
]


@pytest.mark.parametrize("changes,field", INVALID, ids=[f"{f}:{c}" for c, f in INVALID])
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        _cfg(**changes)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_dict_unknown_key():
    data = get_config("transformer", "tiny").to_dict()
    data["n_experts"] = 8
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.from_dict(data)


def test_from_dict_validates():
    data = get_config("transformer", "tiny").to_dict()
    data["n_kv_heads"] = 3
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dict_round_trip(arch, preset):
    cfg = get_config(arch, preset)
    data = cfg.to_dict()
    assert isinstance(data, dict)
    again = ModelConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    # the dict is a copy: mutating it does not touch the config
    data["dim"] = 1
    assert cfg.dim != 1


def test_json_round_trip():
    import json

    cfg = get_config("yoco-gret", "tiny", retention_chunk=8)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_replace_validates():
    cfg = get_config("yoco-swa", "tiny")
    assert cfg.replace(window=3).window == 3
    with pytest.raises(ConfigError, match="window"):
        cfg.replace(window=0)


# Optional integer fields must be integers, not floats or bools that would fail later, deep in the build.
@pytest.mark.parametrize("changes,field", [
    (dict(arch="yoco-gret", retention_heads=2.0), "retention_heads"),
    (dict(arch="yoco-gret", retention_heads=True), "retention_heads"),
    (dict(arch="yoco-swa", window=8, n_self_layers=1.5), "n_self_layers"),
    (dict(arch="yoco-swa", window=8, n_self_layers=True), "n_self_layers"),
    (dict(arch="yoco-swa", window=True), "window"),
], ids=["retention_heads=2.0", "retention_heads=True", "n_self_layers=1.5", "n_self_layers=True",
        "window=True"])
def test_integer_fields_reject_non_integers(changes, field):
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        _cfg(**changes)


@pytest.mark.parametrize("field,value,expected", [
    ("rope_theta", "1e4", "rope_theta='1e4': must be a number"),
    ("tie_embeddings", "false", "tie_embeddings='false': must be true or false"),
    ("scale_embeddings", 1, "scale_embeddings=1: must be true or false"),
    ("dim", 64.0, "dim=64.0: must be an integer"),
    ("n_layers", True, "n_layers=True: must be an integer"),
    ("window", "16", "window='16': must be an integer or null"),
    ("rope_freqs", 3, "rope_freqs=3: must be a string"),
])
def test_every_field_is_checked_by_type_and_named(field, value, expected, tmp_path, capsys):
    from yoco import build_model, save_model
    from yoco.cli import main

    with pytest.raises(ConfigError, match=re.escape(expected)):
        get_config("yoco-swa", "tiny", **{field: value})
    save_model(build_model("yoco-swa", preset="tiny"), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, field: value}))
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_numbers_from_json_keep_their_meaning():
    assert get_config("transformer", "tiny", rope_theta=10000).rope_theta == 10000  # an int for a float field
