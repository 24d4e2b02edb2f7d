"""Checkpoints round-trip exactly and bad ones fail with a clear error, never silently."""

import json

import pytest
import torch
from harness import make_model

from yoco import CheckpointError, load_model, save_model
from yoco.report import atomic_write


def test_round_trip_gives_identical_logits(variant, tmp_path):
    model = make_model(variant)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_bf16_load(tmp_path):
    save_model(make_model("yoco-swa"), tmp_path)
    assert next(load_model(tmp_path, dtype="bf16").parameters()).dtype == torch.bfloat16


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json.*missing"):
        load_model(tmp_path)
    save_model(make_model("transformer"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)


def test_corrupt_and_truncated_weights(tmp_path):
    save_model(make_model("yoco-gret"), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_config_problems(tmp_path):
    save_model(make_model("transformer"), tmp_path)
    config = tmp_path / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "arch": "mamba"}))
    with pytest.raises(CheckpointError, match="arch='mamba'.*unknown architecture"):
        load_model(tmp_path)
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    # Weights of another architecture under this config.
    config.write_text(json.dumps({**data, "arch": "yoco-swa", "window": 16}))
    with pytest.raises(CheckpointError, match="does not match its yoco-swa config"):
        load_model(tmp_path)
    config.write_text(json.dumps({**data, "ffn_dim": 96}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path)


def test_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old and whole")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
