"""yoco study on a tiny budget: matched parameters, every field, the tables and plots."""

import json

import pytest

from yoco.cli import main
from yoco.config import get_config
from yoco.study import match_ffn, parameter_count


@pytest.mark.parametrize("arch", ["yoco-swa", "yoco-gret", "mqa", "mla", "block"])
def test_ffn_width_matches_parameters(arch):
    target = parameter_count(get_config("transformer", "small"))
    ffn, params = match_ffn(arch, "small", target)
    assert ffn % 8 == 0
    step = parameter_count(get_config(arch, "small", ffn_dim=ffn + 8)) - params  # params per 8 FFN units
    assert abs(params - target) <= step


def test_study_writes_results(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n\n" * 30)
    argv = ["study", "--arch", "transformer,yoco-swa,swa", "--window", "32", "--steps", "2", "--batch-size", "2", "--seq-len", "64",
            "--data", str(corpus), "--vocab-size", "400", "--trials", "1", "--out", str(tmp_path / "study")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    runs = results["runs"]
    for r in runs:  # the count printed while matching is the count trained (a 400-id tokenizer, not 4096)
        assert f"{r['arch']}: ffn_dim {r['ffn_dim']} -> {r['params'] / 1e6:.2f}M parameters" in printed
    assert [r["arch"] for r in runs] == ["transformer", "yoco-swa", "swa"]
    assert results["settings"]["window"] == 32 and results["settings"]["passkey_beyond_context"] >= 4 * 32
    for r in runs:
        assert {"arch", "params", "train_tokens", "val_loss", "kv_bytes_per_token", "passkey_acc_in_window",
                "passkey_acc_beyond_window"} <= set(r)
        assert r["train_tokens"] == 2 * 2 * 64 and r["val_loss"] > 0
    assert runs[0]["kv_bytes_per_token"] == 4 * runs[1]["kv_bytes_per_token"]  # 4 layers vs one global KV
    # The window-only control stops growing: 4 rings of 32 positions x 2 KV heads x 32 dims x (K, V) x fp32
    assert runs[2]["kv_bytes_per_token"] == 0 and runs[2]["cache_bytes_per_token_4k"] == 4 * 32 * 2 * 32 * 2 * 4 / 4096
    for arch, window in (("yoco-swa", 32), ("swa", 32), ("transformer", None)):
        assert json.loads((tmp_path / "study" / arch / "checkpoint-2" / "config.json").read_text())["window"] == window
    assert abs(runs[0]["params"] - runs[1]["params"]) < 0.02 * runs[0]["params"]
    for name in ("results.md", "pareto.png", "loss_curves.png", "retrieval.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0
    assert "| yoco-swa |" in (tmp_path / "study" / "results.md").read_text()
    # The final loss covers the whole held-out split, and is that checkpoint's loss over it.
    from yoco.checkpoint import load_model
    from yoco.data import TokenShards
    from yoco.evaluate import validation_loss

    val = TokenShards(tmp_path / "study" / "data", "val")
    assert all(r["val_tokens"] == (len(val) - 1) // 64 * 64 for r in runs)
    again = validation_loss(load_model(tmp_path / "study" / "swa" / "checkpoint-2"), val, 2, 64, None)
    assert runs[2]["val_loss"] == pytest.approx(again["val_loss"], rel=1e-6)
    # Re-running the study re-evaluates the finished runs without training them again.
    metrics = (tmp_path / "study" / "swa" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert (tmp_path / "study" / "swa" / "metrics.jsonl").read_text() == metrics
    rerun = json.loads((tmp_path / "study" / "results.json").read_text())["runs"]
    assert [r["val_loss"] for r in rerun] == pytest.approx([r["val_loss"] for r in runs], rel=1e-6)
    assert main(["study", "--arch", "mamba", "--out", str(tmp_path / "x")]) == 2


def test_loss_curves_have_a_title_and_whole_steps():
    import matplotlib.pyplot as plt

    from yoco.study import loss_curves_figure

    fig = loss_curves_figure({"transformer": [(1, 5.2), (2, 4.9), (3, 4.1)], "yoco-swa": [(1, 5.3), (3, 4.0)]})
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_title() and [t.get_text() for t in ax.get_legend().get_texts()] == ["transformer", "yoco-swa"]
    steps = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert steps and all(float(t).is_integer() for t in steps)  # not 1.25, 1.5, ...
    plt.close(fig)


def retrieval_run(arch: str, in_window=None, beyond=0.5, mqar=0.25) -> dict:
    return {"arch": arch, "passkey_acc_in_window": in_window, "passkey_acc_beyond_window": beyond, "mqar_acc": mqar}


def test_retrieval_draws_only_what_was_measured():
    import matplotlib.pyplot as plt

    from yoco.study import retrieval_figure

    # The window is too small for the needle (no run has an in-window figure); swa has no MQAR figure.
    runs = [retrieval_run("transformer"), retrieval_run("yoco-swa", beyond=0.0), retrieval_run("swa", mqar=None)]
    fig = retrieval_figure({"settings": {"window": 16}, "runs": runs})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["passkey beyond window", "MQAR"]
    assert "passkey in window" in ax.get_title() and "not measured" in ax.get_title()
    bars = {label: [(round(b.get_x() + b.get_width() / 2), b.get_height()) for b in container]
            for label, container in zip(["beyond", "mqar"], ax.containers)}
    assert bars == {"beyond": [(0, 0.5), (1, 0.0), (2, 0.5)],  # a measured 0 is drawn (flat), as measured
                    "mqar": [(0, 0.25), (1, 0.25)]}  # swa: no bar, rather than a 0 bar
    plt.close(fig)

    fig = retrieval_figure({"settings": {"window": 64}, "runs": [retrieval_run("transformer", in_window=1.0)]})
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) == 3 and "not measured" not in ax.get_title()
    plt.close(fig)


def test_close_losses_and_late_steps_are_labelled_without_an_offset():
    import matplotlib.pyplot as plt

    from yoco.study import loss_curves_figure, pareto_figure

    losses = [427.41, 427.42, 427.43, 427.45]  # matplotlib's default: ticks 0.01..0.05 and "+4.274e2" aside
    pareto = pareto_figure([{"arch": f"a{i}", "val_loss": loss, "cache_bytes_per_token_4k": 2 ** (10 + i)}
                            for i, loss in enumerate(losses)])
    curves = loss_curves_figure({"transformer": [(100_000 + i, loss) for i, loss in enumerate(losses)]})
    for fig in (pareto, curves):
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
        assert all(t.get_text().startswith("427.4") for t in ax.get_yticklabels() if t.get_text())
        plt.close(fig)
