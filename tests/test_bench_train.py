"""yoco bench --train on tiny sizes: every field for every arch and row length, the Trainer peer, refusals."""

import json

import pytest

from yoco.bench_train import TrainBenchSettings, random_rows, run_train_bench, train_config, train_ratio_rows
from yoco.cli import main


def tiny(**changes) -> TrainBenchSettings:
    return TrainBenchSettings(**{"archs": ("transformer", "yoco-swa", "hf-llama"), "seq_lens": (32,), "preset": "tiny",
                                 "steps": 2, "warmup": 1, **changes})


@pytest.fixture(scope="module")
def report():
    return run_train_bench(tiny(), log=lambda text: None)


def test_every_arch_trains_and_is_timed(report):
    assert [(r["arch"], r["seq_len"]) for r in report["results"]] == [
        ("transformer", 32), ("yoco-swa", 32), ("hf-llama", 32)]
    for r in report["results"]:
        assert r["tok_s"] == pytest.approx(2 * 1 * 32 / (2 * r["step_s"]))  # timed tokens over timed seconds
        assert r["params"] > 0 and r["step_s"] > 0
    params = {r["arch"]: r["params"] for r in report["results"]}
    assert params["hf-llama"] == params["transformer"]  # the peer has the Transformer's dimensions (and tying)
    assert {"matmul_flops", "read_bandwidth_bytes_s", "busy"} <= set(report["machine"])
    lines = train_ratio_rows(report)
    assert [line.split(":")[0] for line in lines] == ["training transformer vs hf-llama @ 32-token rows",
                                                      "training yoco-swa vs transformer @ 32-token rows"]


def test_both_sides_train_on_the_same_rows():
    settings = tiny(batch_size=2)
    config = train_config("hf-llama", settings)
    first, again = random_rows(config, settings, 16, 3), random_rows(config, settings, 16, 3)
    assert first.shape == (2, 17) and first.equal(again)
    assert not first.equal(random_rows(config, settings, 16, 4))


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    argv = ["bench", "--train", "--preset", "tiny", "--arch", "transformer,yoco-swa", "--context", "32",
            "--train-steps", "1", "--dtype", "bf16", "--json", str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["settings"]["dtype"] == "bf16" and [r["arch"] for r in report["results"]] == ["transformer", "yoco-swa"]
    assert "| yoco-swa | 32 |" in (tmp_path / "t.md").read_text()
    assert "training yoco-swa vs transformer @ 32-token rows" in capsys.readouterr().out
    # without --dtype, training autocasts to bf16 (what people train in); fp32 is asked for
    for given, dtype in (([], "bf16"), (["--dtype", "fp32"], "fp32")):
        argv = ["bench", "--train", "--preset", "tiny", "--arch", "transformer", "--context", "32", "--train-steps", "1",
                "--json", str(tmp_path / "d.json")] + given
        assert main(argv) == 0
        assert json.loads((tmp_path / "d.json").read_text())["settings"]["dtype"] == dtype


@pytest.mark.parametrize("extra,message", [
    (["--kv-bits", "4"], "--kv-bits measure inference"),
    (["--compile", "--new-tokens", "4"], "--compile, --new-tokens measure inference"),
    (["--arch", "nope"], "unknown architecture"),
    (["--batch-size", "0"], "--batch-size"),
    (["--train-steps", "-1"], "--train-steps"),
])
def test_cli_refuses_what_does_not_apply(extra, message, capsys):
    assert main(["bench", "--train", "--preset", "tiny", "--context", "32"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
