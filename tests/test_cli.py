"""The yoco command line, run in-process."""

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

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


def test_generate_compile_decodes_with_the_compiled_step(monkeypatch, capsys):
    compiled = []  # torch.compile stood in for by a recorder (the real one is tested in test_decode_step.py)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append((fn.__name__, options)) or fn)
    argv = ["generate", "--arch", "yoco-swa", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert compiled == []
    assert main(argv + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert compiled == [("sampled_decode_step", {"dynamic": True})]
    assert main(["generate", "--arch", "block", "--prompt-ids", "1,2,3", "--compile"]) == 2
    assert "decode it without compile" in capsys.readouterr().err


def test_init_then_generate_from_checkpoint(tmp_path, capsys):
    assert main(["init", "--arch", "yoco-swa", "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt-ids", "5 6", "--max-new-tokens", "2"]) == 0
    assert "yoco-swa" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt-ids", "1,x"], "argument --prompt-ids: 'x': must be a token id"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt-ids", "1", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt-ids", "1", "--max-new-tokens", "5000"], "exceeds the model's max_seq_len"),
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt-ids", "1"], "does not exist"),
    (["generate", "--prompt-ids", "1", "--kv-bits", "3"], "argument --kv-bits: must be 8, 4 or 2 bits, got '3'"),
    (["generate", "--prompt-ids", "1", "--kv-bits", "4"], "kv group size 32 must divide the value dim 16"),
    (["generate", "--prompt-ids", "1", "--kv-bits", "4", "--kv-group", "8", "--compile"], "decode it without compile"),
    (["demo", "--preset", "tiny", "--context", "0"], "argument --context: must be a positive integer, got '0'"),
    (["train", "--arch", "yoco-gret", "--window", "8", "--out", "/nonexistent/run"], "yoco-gret has no sliding window"),
    (["train", "--arch", "swa", "--window", "0", "--out", "/nonexistent/run"], "argument --window: must be a positive"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_arch_is_rejected_by_the_parser(capsys):
    assert main(["generate", "--arch", "mamba", "--prompt", "x"]) == 2
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


# What each command needs besides the option under test (never run: parsing alone is checked).
MINIMAL_ARGV = {"demo": [], "bench": [], "kv-table": [], "convert": ["--out", "x"], "train": ["--out", "x"],
                "eval": ["--checkpoint", "x"], "compress-eval": [], "study": ["--out", "x"],
                "generate": ["--prompt-ids", "1"], "init": ["--arch", "mha", "--out", "x"], "serve": ["x"],
                "bench-serve": []}
# Options for which 0 means something: seeds, steps of something that may be skipped, greedy decoding,
# no retrieval rows, a needle at the very start, torch's thread count, token id 0.
ZERO_IS_MEANINGFUL = {"--seed", "--warmup", "--short-steps", "--temperature", "--retrieval-mix", "--depths",
                      "--threads", "--stop", "--prompt-ids", "--kv-residual"}


def subcommands():
    from yoco.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def numeric_options():
    for command, parser in subcommands().items():
        for action in parser._actions:
            if action.option_strings and action.type is not None:
                yield command, action


def test_every_command_is_walked_and_no_option_takes_a_bare_number():
    assert set(subcommands()) == set(MINIMAL_ARGV)
    bare = [(c, a.option_strings[0]) for c, a in numeric_options() if a.type in (int, float)]
    assert not bare, f"options without a range check: {bare}"
    assert len(list(numeric_options())) > 50


@pytest.mark.parametrize("command,option", [(c, a.option_strings[0]) for c, a in numeric_options()])
def test_zero_and_minus_one_are_refused_with_one_line_naming_the_option(command, option, capsys):
    parser = subcommands()[command]
    for value in ("-1", "0"):
        argv = MINIMAL_ARGV[command] + [option, value]
        if value == "0" and option in ZERO_IS_MEANINGFUL:
            parser.parse_args(argv)  # accepted
            continue
        assert main([command, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {option}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", sorted(MINIMAL_ARGV))
def test_every_option_has_help_showing_its_default(command, capsys):
    parser = subcommands()[command]
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.default not in (None, False, []) and not action.required:
            assert f"(default: {action.default})" in text or "default" in action.help, (command, action.option_strings)


def test_demo_and_kv_table_report_one_growth_figure_and_take_arch_lists_both_ways(capsys):
    from yoco.config import get_config
    from yoco.models import cache_growth_per_token
    from yoco.report import format_bytes

    assert main(["demo", "--preset", "tiny", "--arch", "block", "--arch", "transformer,yoco-gret", "--context", "40",
                 "--new-tokens", "2"]) == 0
    demo = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[4:] if line.strip()}
    assert list(demo) == ["block", "transformer", "yoco-gret"]
    assert main(["kv-table", "--preset", "tiny", "--arch", "block,yoco-gret", "--arch", "transformer",
                 "--context", "64"]) == 0
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:] if line.strip()}
    assert list(table) == ["block", "yoco-gret", "transformer"]
    for arch in demo:
        growth = cache_growth_per_token(get_config(arch, "tiny"), torch.float32)
        assert growth > 0  # every one of these grows with context (block: one entry per 4 tokens)
        assert f" {format_bytes(growth)} " in demo[arch]  # the demo's growth/token column
        assert table[arch][3] == f"{growth:,.0f}"  # kv-table's formula column
    # ratios below 1 are said the other way round ("4.9x larger", never "0.2x smaller")
    assert re.search(r" \d+\.\dx larger ", demo["transformer"]) and table["block"][-1] == "smaller"
