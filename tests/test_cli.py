"""The yoco command line, run in-process."""

import json
import shutil
from pathlib import Path

import pytest

from yoco.checkpoint import latest_checkpoint
from yoco.cli import main
from yoco.data import train_tokenizer
from yoco.tokenizer import TrainedTokenizer


def test_generate_text_and_stream(capsys):
    assert main(["generate", "--arch", "yoco-gret", "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "yoco-gret" in err and "4 new" in err
    assert main(["generate", "--arch", "transformer", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--stream"]) == 0
    assert len(capsys.readouterr().out.split()) == 3


def test_init_then_generate_from_checkpoint(tmp_path, capsys):
    assert main(["init", "--arch", "yoco-swa", "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt-ids", "5 6", "--max-new-tokens", "2"]) == 0
    assert "yoco-swa" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt-ids", "1,x"], "must be integers"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt-ids", "1", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt-ids", "1", "--max-new-tokens", "5000"], "exceeds the model's max_seq_len"),
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt-ids", "1"], "does not exist"),
    (["demo", "--preset", "tiny", "--context", "0"], "must be positive"),
    (["train", "--arch", "yoco-gret", "--window", "8", "--out", "/nonexistent/run"], "yoco-gret has no sliding window"),
    (["train", "--arch", "swa", "--window", "0", "--out", "/nonexistent/run"], "window=0"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_arch_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--arch", "mamba", "--prompt", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_runs_every_architecture(capsys):
    assert main(["demo", "--preset", "tiny", "--context", "64", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for arch in ("transformer", "yoco-swa", "yoco-gret"):
        assert arch in out


@pytest.mark.parametrize("arch", ["mla", "mqa-cla2", "mlkv", "block"])
def test_generate_every_family_member(arch, capsys):
    assert main(["generate", "--arch", arch, "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert f"[{arch}," in capsys.readouterr().err


def test_kv_table_command(capsys):
    assert main(["kv-table", "--preset", "tiny", "--context", "64"]) == 0
    out = capsys.readouterr().out
    for arch in ("transformer", "mla", "cla2", "mlkv", "block", "yoco-swa"):
        assert f"\n{arch} " in out


def test_convert_carries_the_tokenizer_and_generate_reads_a_run_folder(trained_run, tmp_path, capsys):
    from yoco import build_model, save_model
    from yoco.data import EOS, load_tokenizer
    from yoco.tokenizer import save_tokenizer

    trained = load_tokenizer(trained_run / "data")
    source = tmp_path / "gqa"  # a Transformer with the run's 300-id tokenizer, as `yoco train` saves one
    save_model(build_model("transformer", preset="tiny", vocab_size=300, seed=0), source,
               eos_token_id=trained.token_to_id(EOS), tokenizer=trained)
    save_tokenizer(trained, source, 1024)
    out = tmp_path / "mqa"
    assert main(["convert", "--checkpoint", str(source), "--kv-heads", "1", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == trained.token_to_id(EOS) is not None
    tokenizer = TrainedTokenizer(out, 300)
    prompt = "def f1(x):\n    return"
    assert len(tokenizer.encode(prompt)) < len(prompt.encode())  # the trained BPE, not bytes
    for folder in (out, trained_run):  # a run folder stands for its latest checkpoint
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(folder), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
        assert f"prompt {len(tokenizer.encode(prompt))} tokens" in capsys.readouterr().err


def test_text_needs_the_models_own_tokenizer(trained_run, tmp_path, capsys):
    from yoco.tokenizer import byte_level_tokenizer, save_tokenizer

    source = latest_checkpoint(trained_run)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "def", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and "300 ids is not byte-sized" in err and "Traceback" not in err
    assert main(["generate", "--checkpoint", str(bare), "--prompt-ids", "5,6", "--max-new-tokens", "2"]) == 0
    save_tokenizer(byte_level_tokenizer(300), bare, 1024)  # 258 ids beside a model trained with 300
    data = str(trained_run / "data")
    for argv in (["generate", "--checkpoint", str(bare), "--prompt", "def"],
                 ["eval", "--checkpoint", str(bare), "--data", data],
                 ["compress-eval", "--model", str(bare), "--data", data]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "has 258 ids but the model was trained with 300" in err and len(err.strip().splitlines()) == 1
    # as many ids, another vocabulary (a BPE trained on other text)
    other = train_tokenizer([Path(json.__file__).read_text()], 300)
    assert other.get_vocab_size() == 300
    other.save(str(bare / "tokenizer.json"))
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "def"]) == 2
    assert "has the 300 ids of the model's but another vocabulary" in capsys.readouterr().err
