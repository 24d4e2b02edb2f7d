"""The KV-reduction family on the Transformer: cross-layer sharing, MLA wiring, the GQA converter,
the KV table, and the errors on invalid combinations."""

import pytest
import torch
from harness import make_model

from yoco import ConfigError, build_model, get_config
from yoco.bench import kv_table
from yoco.cli import main
from yoco.convert import convert_kv_heads


@pytest.mark.parametrize("changes,sources", [
    (dict(n_layers=12, cla_factor=2), [0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10]),
    (dict(n_layers=12, cla_factor=3), [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]),
    # MLKV: KV layers [0] + [int((i+1) L / L_kv)], the rest read the most recent one.
    (dict(n_layers=12, mlkv_layers=4), [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]),
    (dict(n_layers=6, mlkv_layers=4), [0, 1, 1, 3, 4, 4]),
    (dict(n_layers=5, mlkv_layers=1), [0, 0, 0, 0, 0]),
    (dict(n_layers=4), [0, 1, 2, 3]),
])
def test_kv_sources(changes, sources):
    assert get_config("transformer", "tiny", **changes).kv_sources == sources


@pytest.mark.parametrize("variant", ["cla2", "mqa-cla2", "mlkv", "mla", "mla-q-cla2"])
def test_only_producing_layers_have_kv_weights_and_caches(variant):
    model = make_model(variant)
    sources = model.config.kv_sources
    producers = [i for i, s in enumerate(sources) if s == i]
    cache = model.new_cache(2, capacity=10)
    assert len(cache.layers) == len(producers)
    for i, layer in enumerate(model.layers):
        names = {name.split(".")[0] for name, _ in layer.mixer.named_parameters()}
        owns = bool(names & {"k_proj", "v_proj", "kv_down", "k_rope"})
        assert owns == (i in producers), (i, names)


def test_mla_cache_holds_only_latent_and_rope_key():
    model = make_model("mla")
    cfg = model.config
    cache = model.new_cache(1, capacity=100)
    assert cache.nbytes() == cfg.n_layers * (cfg.mla_kv_rank + cfg.mla_rope_dim) * 4 * 100
    gqa = make_model("transformer").new_cache(1, capacity=100).nbytes()
    assert cache.nbytes() == gqa * (24 + 8) // (2 * 2 * 16)  # tiny: d_c + d_R = 32 vs 2 * n_kv * d_h = 64


def test_shared_keys_carry_their_own_positions():
    # A consumer reuses the producer's K already rotated at the keys' true positions, so a CLA model
    # whose consumer queries equal the producer's computes the same attention in both layers.
    model = make_model("cla2")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        producer, consumer = model.layers[0].mixer, model.layers[1].mixer
        consumer.q_proj.weight.copy_(producer.q_proj.weight)
        consumer.o_proj.weight.copy_(producer.o_proj.weight)
        from yoco.layers import Step
        step = Step(0, 12, None, ids.device)
        x = model.embed_tokens(ids)
        shared = {}
        out_producer = producer(x, step, None, shared=shared)
        out_consumer = consumer(x, step, None, shared=shared)
    torch.testing.assert_close(out_consumer, out_producer)


def test_consumer_without_its_source_raises():
    model = make_model("cla2")
    from yoco.layers import Step
    with pytest.raises(RuntimeError, match="layer 1 reads the K/V of layer 0"):
        model.layers[1].mixer(torch.zeros(1, 3, 64), Step(0, 3, None, torch.device("cpu")), None, shared={})


def _mha_with_equal_heads_per_group(n_groups: int):
    model = build_model("mha", preset="tiny", seed=0)
    cfg = model.config
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                heads = proj.weight.view(cfg.n_kv_heads, cfg.head_dim, -1)
                group = cfg.n_kv_heads // n_groups
                for g in range(n_groups):
                    heads[g * group:(g + 1) * group] = heads[g * group].clone()
    return model


@pytest.mark.parametrize("n_kv", [2, 1])
def test_converter_is_exact_when_heads_within_groups_are_equal(n_kv):
    mha = _mha_with_equal_heads_per_group(n_kv)
    gqa = convert_kv_heads(mha, n_kv)
    assert gqa.config.n_kv_heads == n_kv and gqa.config.n_heads == mha.config.n_heads
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    assert gqa.new_cache(1, capacity=10).nbytes() * (mha.config.n_kv_heads // n_kv) == mha.new_cache(1, capacity=10).nbytes()


def test_converter_mean_pools_and_rejects_bad_targets():
    mha = build_model("mha", preset="tiny", seed=0)
    gqa = convert_kv_heads(mha, 2)
    w = mha.layers[0].mixer.k_proj.weight.view(4, 16, 64)
    torch.testing.assert_close(gqa.layers[0].mixer.k_proj.weight.view(2, 16, 64), w.view(2, 2, 16, 64).mean(1))
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        convert_kv_heads(mha, 3)
    with pytest.raises(ConfigError, match="not arch=yoco-swa"):
        convert_kv_heads(build_model("yoco-swa", preset="tiny"), 1)


def test_convert_cli(tmp_path, capsys):
    assert main(["init", "--arch", "mha", "--out", str(tmp_path / "mha")]) == 0
    assert main(["convert", "--checkpoint", str(tmp_path / "mha"), "--kv-heads", "1", "--out", str(tmp_path / "mqa")]) == 0
    assert "4 -> 1 K/V heads" in capsys.readouterr().out
    assert main(["convert", "--checkpoint", str(tmp_path / "mha"), "--kv-heads", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["convert", "--checkpoint", str(tmp_path / "mha"), "--out", str(tmp_path / "x")]) == 2
    assert main(["convert", "--checkpoint", str(tmp_path / "mha"), "--kv-heads", "1", "--cla-factor", "2",
                 "--out", str(tmp_path / "mqa-cla2")]) == 0
    assert "[0, 0, 2, 2]" in capsys.readouterr().out
    from yoco import load_model

    assert load_model(tmp_path / "mqa-cla2").config.kv_sources == [0, 0, 2, 2]


def test_kv_table_formula_equals_measurement():
    rows = kv_table("tiny", context=64)
    by = {r["arch"]: r for r in rows}
    for r in rows:
        assert r["measured_bytes_per_token"] == r["formula_bytes_per_token"], r["arch"]
    assert by["transformer"]["formula_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    assert by["mqa"]["formula_bytes_per_token"] * 2 == by["gqa"]["formula_bytes_per_token"]
    assert by["cla2"]["formula_bytes_per_token"] * 2 == by["gqa"]["formula_bytes_per_token"]
    assert by["mla"]["formula_bytes_per_token"] == 4 * (24 + 8) * 4
    assert by["yoco-swa"]["formula_bytes_per_token"] * 4 == by["transformer"]["formula_bytes_per_token"]
    # Block Transformer: 2 block-decoder layers, one K/V entry per block of 4 tokens.
    assert by["block"]["formula_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 / 4


@pytest.mark.parametrize("changes,field", [
    (dict(cla_factor=3), "cla_factor"),  # does not divide 4 layers
    (dict(cla_factor=0), "cla_factor"),
    (dict(mlkv_layers=5), "mlkv_layers"),
    (dict(mlkv_layers=2, cla_factor=2), "mlkv_layers"),
    (dict(cla_factor=2, window=8), "window"),
    (dict(attention="mla", mla_rope_dim=7), "mla_rope_dim"),
    (dict(attention="mla", mla_kv_rank=0), "mla_kv_rank"),
    (dict(attention="mla", window=8), "attention"),
    (dict(attention="xla"), "attention"),
    (dict(block_len=0), "block_len"),
])
def test_invalid_family_combinations_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        get_config("transformer", "tiny", **changes)


def test_yoco_rejects_transformer_only_options():
    with pytest.raises(ConfigError, match="cla_factor="):
        get_config("yoco-swa", "tiny", cla_factor=2)
    with pytest.raises(ConfigError, match="attention="):
        get_config("yoco-gret", "tiny", attention="mla")


@pytest.mark.parametrize("kwargs,sources", [
    (dict(cla_factor=2), [0, 0, 2, 2]),
    (dict(mlkv_layers=3), [0, 1, 2, 2]),
])
def test_share_kv_layers_averages_each_group_into_its_producer(kwargs, sources):
    from yoco.convert import share_kv_layers

    base = build_model("transformer", preset="tiny", seed=0)
    shared = share_kv_layers(base, **kwargs)
    assert shared.config.kv_sources == sources
    for producer in set(sources):
        readers = [i for i, s in enumerate(sources) if s == producer]
        for proj in ("k_proj", "v_proj"):
            expected = torch.stack([getattr(base.layers[i].mixer, proj).weight for i in readers]).mean(0)
            torch.testing.assert_close(getattr(shared.layers[producer].mixer, proj).weight, expected)
    torch.testing.assert_close(shared.layers[1].mixer.q_proj.weight, base.layers[1].mixer.q_proj.weight)
    # With a factor of 1 every layer is its own producer: the model is unchanged.
    same = share_kv_layers(base, cla_factor=1)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(same(ids), base(ids))
    with pytest.raises(ConfigError, match="cla_factor=3"):
        share_kv_layers(base, cla_factor=3)
    with pytest.raises(ConfigError, match="without sharing"):
        share_kv_layers(shared, cla_factor=2)
