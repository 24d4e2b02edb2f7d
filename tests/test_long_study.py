"""yoco study --long on a tiny budget: a run per position option, the training-free extensions on the
rope run's weights, the Transformer control stopped where its quadratic prefill would run too long."""

import json

import pytest

from yoco.checkpoint import load_model
from yoco.cli import main
from yoco.config import ConfigError
from yoco.long_study import QUICK_OPTION, LongStudySettings, markdown, run_long_study


def test_a_run_per_option_scored_at_every_context(corpus, tmp_path):
    settings = LongStudySettings(options=("rope", "nope-log", "rope-yarn", "transformer"), preset="tiny", window=16,
                                 steps=2, batch_size=2, seq_len=128, short_seq_len=None, contexts=(128, 512),
                                 depths=(0.0, 1.0), trials=1, control_limit=128, prefill_chunk=64, corpus=[corpus],
                                 vocab_size=400)
    results = run_long_study(settings, tmp_path, log=lambda s: None, progress=False)
    runs = {r["position"]: r for r in results["runs"]}
    assert list(runs) == ["rope", "nope-log", "rope-yarn", "transformer"]
    for r in runs.values():
        assert {"arch", "position", "train_len", "val_loss", "passkey_by_context"} <= set(r)
        assert r["train_len"] == 128 and r["val_loss"] > 0
        assert all(0 <= a <= 1 for a in r["passkey_by_context"].values())
        assert all(c["seconds"] > 0 and c["peak_rss_bytes"] > 0 for c in r["cells"])
        assert (tmp_path / f"passkey-{r['position']}.png").stat().st_size > 0
    assert set(runs["rope"]["passkey_by_context"]) == {"128", "512"}
    # NoPE with the log temperature is trained so (its own run folder)
    config = load_model(tmp_path / "nope-log" / "checkpoint-2").config
    assert (config.global_position, config.attn_temperature, config.attn_train_len) == ("nope", "log", 128)
    # YaRN evaluates the rope run's weights, extended by context / training length beyond the training length
    assert not (tmp_path / "rope-yarn").exists()
    assert runs["rope-yarn"]["val_loss"] == pytest.approx(runs["rope"]["val_loss"])
    positions = {c["context"]: c["positions"] for c in runs["rope-yarn"]["cells"]}
    assert positions[128] == {} and positions[512] == {"rope_extension": "yarn", "rope_factor": 4.0,
                                                        "rope_original_len": 128}
    # the quadratic control stops at control_limit, and says why
    assert set(runs["transformer"]["passkey_by_context"]) == {"128"}
    assert "quadratic" in runs["transformer"]["stopped"]
    table = markdown(results)
    assert "| nope-log | yoco-swa |" in table and "quadratic" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["position"] for r in saved["runs"]] == list(runs) and saved["complete"]


def test_a_study_stopped_halfway_keeps_the_runs_it_finished(corpus, tmp_path, monkeypatch):
    import yoco.long_study as long_study

    settings = LongStudySettings(options=("rope", "rope-pi"), preset="tiny", window=16, steps=2, batch_size=2,
                                 seq_len=128, short_seq_len=None, contexts=(128,), depths=(0.0,), trials=1,
                                 prefill_chunk=64, corpus=[corpus], vocab_size=400)
    evaluate = long_study.evaluate_option

    def stop_at_the_second(name, *args, **kwargs):
        if name == "rope-pi":
            raise KeyboardInterrupt
        return evaluate(name, *args, **kwargs)

    monkeypatch.setattr(long_study, "evaluate_option", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_long_study(settings, tmp_path, log=lambda s: None, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["position"] for r in saved["runs"]] == ["rope"] and not saved["complete"]
    assert "so far (1 of 2 runs)" in (tmp_path / "results.md").read_text()
    # run again, it evaluates only what it had not: the rope run is kept as it was
    evaluated = []
    monkeypatch.setattr(long_study, "evaluate_option", lambda name, *a, **k: evaluated.append(name) or evaluate(name, *a, **k))
    results = run_long_study(settings, tmp_path, log=lambda s: None, progress=False)
    assert evaluated == ["rope-pi"] and results["complete"] and results["kept"] == ["rope"]
    assert "runs kept from an earlier one, not counted: rope" in markdown(results)
    assert results["runs"][0] == saved["runs"][0] and [r["position"] for r in results["runs"]] == ["rope", "rope-pi"]
    # other settings: nothing is kept
    evaluated.clear()
    run_long_study(LongStudySettings(**{**settings.__dict__, "trials": 2}), tmp_path, log=lambda s: None, progress=False)
    assert evaluated == ["rope", "rope-pi"]


def test_another_control_limit_scores_the_control_again_and_keeps_the_rest(corpus, tmp_path, monkeypatch):
    import yoco.long_study as long_study

    settings = LongStudySettings(options=("rope", "transformer"), preset="tiny", window=16, steps=2, batch_size=2,
                                 seq_len=128, short_seq_len=None, contexts=(128, 256), depths=(0.0,), trials=1,
                                 control_limit=128, prefill_chunk=64, corpus=[corpus], vocab_size=400)
    first = run_long_study(settings, tmp_path, log=lambda s: None, progress=False)
    control = first["runs"][1]
    assert set(control["passkey_by_context"]) == {"128"}
    assert "scored up to 128 tokens" in control["stopped"] and "one of 256 would take about 4x" in control["stopped"]
    evaluate, evaluated = long_study.evaluate_option, []
    monkeypatch.setattr(long_study, "evaluate_option", lambda name, *a, **k: evaluated.append(name) or evaluate(name, *a, **k))
    again = run_long_study(LongStudySettings(**{**settings.__dict__, "control_limit": 256}), tmp_path,
                           log=lambda s: None, progress=False)
    assert evaluated == ["transformer"] and again["runs"][0] == first["runs"][0]
    assert set(again["runs"][1]["passkey_by_context"]) == {"128", "256"} and again["runs"][1]["stopped"] is None


def test_the_command_and_its_quick_form(tmp_path, monkeypatch):
    import yoco.long_study as long_study

    seen = []
    monkeypatch.setattr(long_study, "run_long_study", lambda settings, out: seen.append(settings) or
                        {"settings": {**settings.__dict__}, "seconds": 1.0, "runs": []})
    assert main(["study", "--long", "--quick", "--out", str(tmp_path)]) == 0
    assert seen[0].options == (QUICK_OPTION, "rope")
    assert seen[0].contexts == (65536, 1 << 20) and seen[0].depths == (0.0, 0.5, 1.0) and seen[0].trials == 4
    assert main(["study", "--long", "--options", "nope,rope-ntk", "--contexts", "1K,64K", "--out", str(tmp_path)]) == 0
    assert seen[1].options == ("nope", "rope-ntk") and seen[1].contexts == (1024, 65536)
    # a shared training flag given applies to the long study; one not given keeps the long study's default
    assert main(["study", "--long", "--seq-len", "512", "--window", "32", "--out", str(tmp_path)]) == 0
    assert (seen[2].seq_len, seen[2].window, seen[2].batch_size) == (512, 32, LongStudySettings().batch_size)
    assert seen[2].retrieval_tasks == ("passkey",) and seen[2].short_seq_len == 256


def test_bad_long_study_requests_are_refused(tmp_path, capsys):
    assert main(["study", "--contexts", "1K", "--out", str(tmp_path)]) == 2
    assert "--contexts is an option of the long study" in capsys.readouterr().err
    assert main(["study", "--long", "--options", "alibi", "--out", str(tmp_path)]) == 2
    assert "position option" in capsys.readouterr().err
    for flag in (["--arch", "transformer"], ["--val-batches", "2"]):
        assert main(["study", "--long", *flag, "--out", str(tmp_path)]) == 2
        assert f"{flag[0]} is an option of the architecture study, not of --long" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown position option"):
        LongStudySettings(options=("alibi",)).validate()
