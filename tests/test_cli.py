"""The yoco command line, run in-process."""

import pytest

from yoco.cli import main


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
