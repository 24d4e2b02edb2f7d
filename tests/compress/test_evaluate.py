"""yoco compress-eval on a (briefly) trained checkpoint: the JSON schema, the table, the plot, errors."""

import json
from pathlib import Path

import pytest

from yoco.checkpoint import latest_checkpoint
from yoco.cli import main
from yoco.commands.common import end_of_text_id
from yoco.data import TokenShards, load_tokenizer


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return latest_checkpoint(trained_run)


def test_compress_eval_writes_json_markdown_and_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy",
            "streamingllm,snapkv,pyramidkv,h2o,corm,infllm,infllm:positions=true",
            "--budget", "0.25,48", "--context", "160", "--depths", "0,1", "--trials", "1", "--ppl-rows", "2",
            "--ppl-tokens", "6", "--tasks", "none", "--json", str(out), "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert report["tasks"] == [] and all("task_acc" not in r for r in rows)
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
            "--ppl-tokens", "6", "--tasks", "none", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in rows] == ["full", "tova", "adakv", "adakv:alpha_safeguard=1"]
    assert all(r["cache_bytes"] < rows[0]["cache_bytes"] and r["ppl"] > 1 for r in rows[1:])


def test_compress_eval_has_a_row_per_kv_bit_width(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy", "snapkv,h2o", "--budget", "0.25", "--context",
            "160", "--depths", "0", "--trials", "1", "--ppl-rows", "2", "--ppl-tokens", "6", "--tasks", "none",
            "--kv-bits", "32,8,2",
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


def test_compress_eval_scores_the_task_suite_per_policy_and_budget(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["compress-eval", "--model", str(checkpoint), "--policy", "snapkv", "--budget", "0.5,0.125",
            "--context", "600", "--depths", "0", "--trials", "1", "--ppl-rows", "1", "--ppl-tokens", "4",
            "--tasks", "variable_tracking,single_needle", "--task-samples", "2", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["variable_tracking", "single_needle"] and report["task_samples"] == 2
    for r in report["results"]:
        assert set(r["task_acc"]) == {"variable_tracking", "single_needle"}
        assert all((8 * score).is_integer() for score in r["task_acc"].values())  # eighths: 2 prompts of 4 answers
        assert r["task_mean"] == pytest.approx(sum(r["task_acc"].values()) / 2)
    header = capsys.readouterr().out.splitlines()[0]
    assert "| passkey | variable_tracking | single_needle | task mean | ppl |" in header


TEXT = Path(json.__file__).read_text()  # real text, long enough for a 160-token prompt several times
SMALL_RUN = ["--policy", "streamingllm", "--budget", "0.5", "--context", "160", "--depths", "0", "--trials", "1",
             "--ppl-rows", "1", "--ppl-tokens", "4", "--tasks", "none"]


def test_compress_eval_reads_your_text_with_the_models_tokenizer(checkpoint, tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "notes").write_text(TEXT[:6000])  # plain text without a suffix is read too
    (folder / "more.txt").write_text(TEXT[6000:12000])
    (folder / "blob.bin").write_bytes(b"\0\1\2" * 100)  # not text: passed over
    out = tmp_path / "out" / "r.json"
    out.parent.mkdir()
    cache = out.parent / ".yoco-text-shards"
    tokenizer = load_tokenizer(checkpoint)
    eos = end_of_text_id(checkpoint, tokenizer)

    def evaluate(option, path):
        """Runs compress-eval on the text; returns the shard folders it added and their documents' texts."""
        before = set(cache.iterdir()) if cache.is_dir() else set()
        assert main(["compress-eval", "--model", str(checkpoint), option, str(path), "--json", str(out),
                     *SMALL_RUN]) == 0
        assert json.loads(out.read_text())["results"][0]["ppl"] > 1
        added = sorted(set(cache.iterdir()) - before)
        documents = []
        for shards in added:
            ids = [int(t) for t in TokenShards(shards, "train").tokens]
            assert ids[-1] == eos  # each document ended by the end-of-text id
            ends = [i for i, t in enumerate(ids) if t == eos]
            documents += [tokenizer.decode(ids[a + 1:b]) for a, b in zip([-1] + ends, ends)]
        return added, documents

    # the model's tokenizer, each file a document: the ids give the texts back, in the files' order
    (shards,), documents = evaluate("--text", folder)
    assert documents == [TEXT[6000:12000], TEXT[:6000]]
    built = (shards / "meta.json").stat().st_mtime_ns
    assert evaluate("--text", folder) == ([], [])  # cached: not tokenized again
    assert (shards / "meta.json").stat().st_mtime_ns == built
    (folder / "more.txt").write_text(TEXT[6000:13000])  # changed text: built anew
    assert len(evaluate("--text", folder)[0]) == 1

    lines = tmp_path / "docs.data"  # JSONL whatever its name
    lines.write_text(json.dumps({"text": TEXT[:7000]}) + "\n\n" + json.dumps({"text": TEXT[7000:14000]}) + "\n")
    added, documents = evaluate("--jsonl", lines)
    assert len(added) == 1 and documents == [TEXT[:7000], TEXT[7000:14000]]


def test_compress_eval_refuses_empty_or_missing_text(checkpoint, tmp_path, capsys):
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "empty.txt").write_text("  \n")
    empty_lines = tmp_path / "empty.jsonl"
    empty_lines.write_text("\n")
    for option, path, message in (("--text", blank, "holds no text"), ("--jsonl", empty_lines, "holds no text"),
                                  ("--text", tmp_path / "none", "does not exist"),
                                  ("--jsonl", blank, "is not a file")):
        capsys.readouterr()
        assert main(["compress-eval", "--model", str(checkpoint), option, str(path), "--json",
                     str(tmp_path / "r.json"), *SMALL_RUN]) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # (after the tokenizing progress bar, when it got that far)
        assert message in last and str(path) in last and "Traceback" not in err
    assert not list((tmp_path / ".yoco-text-shards").glob("*"))  # nothing half-built is left to be reused


def test_a_transformers_tokenizer_ends_documents_with_its_config_eos(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path, require_eos=False)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert end_of_text_id(tmp_path, tokenizer) == 2
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="names no end-of-text token"):
        end_of_text_id(tmp_path, tokenizer)


def test_compress_eval_errors(checkpoint, tmp_path, capsys):
    assert main(["compress-eval", "--model", str(checkpoint), "--tasks", "single_needle,passkey"]) == 2
    assert "unknown task(s) passkey" in capsys.readouterr().err
    assert main(["compress-eval", "--model", str(checkpoint), "--context", "60", "--tasks", "multi_value",
                 "--policy", "snapkv", "--budget", "0.5"]) == 2
    assert "context 60 is too short for the multi_value needles" in capsys.readouterr().err
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
