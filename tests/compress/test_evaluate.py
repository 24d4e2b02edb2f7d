"""yoco compress-eval on a (briefly) trained checkpoint: the JSON schema, the table, the plot, errors."""

import json

import pytest

from yoco.cli import main
from yoco.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return latest_checkpoint(trained_run)


def test_compress_eval_writes_json_markdown_and_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy",
            "streamingllm,snapkv,pyramidkv,h2o,corm,infllm,infllm:positions=true",
            "--budget", "0.25,48", "--context", "160", "--depths", "0,1", "--trials", "1", "--ppl-rows", "2",
            "--ppl-tokens", "6", "--json", str(out), "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["policy"], r["budget"]) for r in rows][:3] == [("full", None), ("streamingllm", 0.25), ("streamingllm", 48)]
    assert len(rows) == 15
    for r in rows:
        assert {"policy", "budget", "cache_bytes", "full_cache_bytes", "passkey_acc", "ppl", "decode_tok_s"} <= set(r)
        assert 0 <= r["passkey_acc"] <= 1 and r["ppl"] > 1 and r["decode_tok_s"] > 0
        assert r["full_cache_bytes"] == rows[0]["cache_bytes"]
    full = rows[0]["cache_bytes"]
    assert all(r["cache_bytes"] < full for r in rows[1:])
    infllm = [r for r in rows if r["policy"].startswith("infllm")]
    assert [r["policy"] for r in infllm] == ["infllm"] * 2 + ["infllm:positions=true"] * 2
    assert all(r["offloaded_bytes"] > 0 for r in infllm) and all(r["offloaded_bytes"] == 0 for r in rows[:11])
    assert (tmp_path / "r.md").read_text().startswith("| policy |") and (tmp_path / "r.png").stat().st_size > 0
    assert "| snapkv | 0.25 |" in capsys.readouterr().out


def test_compress_eval_runs_tova_and_adakv(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy", "tova,adakv,adakv:alpha_safeguard=1",
            "--budget", "0.25", "--context", "160", "--depths", "0", "--trials", "1", "--ppl-rows", "2",
            "--ppl-tokens", "6", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in rows] == ["full", "tova", "adakv", "adakv:alpha_safeguard=1"]
    assert all(r["cache_bytes"] < rows[0]["cache_bytes"] and r["ppl"] > 1 for r in rows[1:])


def test_compress_eval_has_a_row_per_kv_bit_width(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy", "snapkv,h2o", "--budget", "0.25", "--context",
            "160", "--depths", "0", "--trials", "1", "--ppl-rows", "2", "--ppl-tokens", "6", "--kv-bits", "32,8,2",
            "--kv-group", "8", "--kv-residual", "16", "--json", str(out), "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["policy"], r["kv_bits"]) for r in rows] == [("full", 32), ("snapkv", 32), ("h2o", 32), ("full", 8),
                                                           ("snapkv", 8), ("full", 2), ("snapkv", 2)]
    full, snap, _, eight, snap8, two, snap2 = rows
    assert snap2["cache_bytes"] < snap8["cache_bytes"] < snap["cache_bytes"]
    assert two["cache_bytes"] < eight["cache_bytes"] < full["cache_bytes"] == eight["full_cache_bytes"]
    assert abs(eight["ppl"] / full["ppl"] - 1) < 0.01  # 8 bits: perplexity within 1%
    assert "| full | - | 8 |" in capsys.readouterr().out
    assert main(argv[:-4] + ["--kv-group", "32"]) == 2  # the tiny model's heads are 16 wide
    assert "kv group size 32 must divide the value dim 16" in capsys.readouterr().err


def test_compress_eval_errors(checkpoint, tmp_path, capsys):
    assert main(["compress-eval", "--model", str(tmp_path / "none")]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--policy", "quest"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--policy", "infllm:topk"]) == 2
    assert "option=value" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--policy", "snapkv:beta=3"]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--policy", "adakv:alpha_safeguard=2"]) == 2
    assert "alpha_safeguard" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--budget", "1.5"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--budget", "0"]) == 2


def test_plot_labels_close_perplexities_without_an_offset():
    import matplotlib.pyplot as plt

    from yoco.compression_eval import results_figure

    rows = [{"policy": policy, "cache_ratio": ratio, "passkey_acc": 1.0, "ppl": ppl}
            for policy, ratio, ppl in (("full", 1.0, 427.41), ("snapkv", 0.25, 427.45), ("snapkv", 0.5, 427.43))]
    fig = results_figure(rows, "KV compression")
    fig.canvas.draw()
    ppl = fig.axes[1]
    assert fig._suptitle.get_text() == "KV compression"
    assert ppl.yaxis.get_offset_text().get_text() == ""  # matplotlib's default: "+4.274e2"
    assert all(t.get_text().startswith("427.4") for t in ppl.get_yticklabels() if t.get_text())
    plt.close(fig)
