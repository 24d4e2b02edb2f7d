"""Evaluation: passkey prompts, MQAR construction and scoring, and `yoco eval` end to end."""

import json

import pytest
import torch
from harness import engine_logits, make_model

from yoco.cli import main
from yoco.evaluate import covered, mqar_accuracy, validation_loss
from yoco.tasks import mqar_batch, passkey_prompt
from yoco.tokenizer import ByteTokenizer


def test_passkey_prompt_length_and_depth():
    tok = ByteTokenizer()
    haystack = list(range(100, 200)) * 20
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(tok.encode, haystack, 400, depth, "12345")
        assert len(p.ids) == 400
        needle = tok.encode(" The pass key is 12345.")
        assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
        assert tok.decode(p.ids).endswith("What is the pass key? The pass key is")
    filler = 400 - len(tok.encode(" The pass key is 12345. Remember it. 12345 is the pass key. ")) - \
        len(tok.encode(" What is the pass key? The pass key is"))
    assert passkey_prompt(tok.encode, haystack, 400, 0.0, "12345").needle_at == 0
    assert passkey_prompt(tok.encode, haystack, 400, 1.0, "12345").needle_at == filler
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok.encode, haystack, 50, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok.encode, haystack, 400, 1.5, "12345")


def test_mqar_batch_structure():
    ids, mask = mqar_batch(5, pairs=8, queries=3, vocab=range(10, 110), seed=1)
    assert ids.shape == mask.shape == (5, 22)
    for row, m in zip(ids, mask):
        pairs = {int(row[i]): int(row[i + 1]) for i in range(0, 16, 2)}
        assert len(pairs) == 8  # distinct keys
        for pos in torch.nonzero(m).flatten().tolist():
            assert pos >= 16 and pairs[int(row[pos - 1])] == int(row[pos])
    assert int(mask.sum()) == 5 * 3


def test_mqar_scoring_with_an_oracle_and_a_guesser():
    ids, mask = mqar_batch(4, pairs=6, queries=4, vocab=range(50), seed=2)

    def oracle(x):
        return torch.nn.functional.one_hot(torch.cat([x[:, 1:], x[:, :1]], dim=1), 50).float()

    def constant(x):
        return torch.zeros(*x.shape, 50)

    assert mqar_accuracy(oracle, ids, mask) == 1.0
    assert mqar_accuracy(constant, ids, mask) < 0.2


class Rows:
    """A held-out split that is exactly these rows (what TokenShards.sequential yields)."""

    split = "val"

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.tokens = ids.flatten()

    def sequential(self, batch_size, seq_len, limit=None):
        yield self.ids[:, :-1], self.ids[:, 1:]


@pytest.mark.parametrize("variant", ["yoco-swa", "block"])
def test_validation_loss_is_cached_generations_loss(variant):
    """yoco eval's loss (a full forward over rows of 23 tokens, not a multiple of the Block
    Transformer's block) is the teacher-forced loss of cached generation over the same rows."""
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    got = validation_loss(model, Rows(ids), batch_size=2, seq_len=23, batches=None)["val_loss"]
    logits = engine_logits(model, ids[:, :-1], 1, chunk=5)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_the_slice_a_validation_loss_covers_is_named():
    result = {"tokens": 4096, "split_tokens": 51200, "split": "val", "batches": 2, "whole_split": False}
    assert covered(result) == "the first 4,096 of the 51,200 held-out tokens"
    assert covered({**result, "tokens": 51000, "whole_split": True}) == \
        "the whole held-out split (51,000 of its 51,200 tokens in whole rows)"
    assert covered({**result, "split": "train"}) == "the first 4,096 of the 51,200 train tokens"
    assert covered({**result, "tokens": 0, "split_tokens": 3}) == "no row: the 3 held-out tokens are fewer than one row"


def tiny_run(root, data_dir=None):
    """A 3-step tiny training run in root/run (its data in ``data_dir``: a study's shared folder), and
    its checkpoint."""
    from yoco.train import TrainSettings, latest_checkpoint, train

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n\n" * 20)
    train(TrainSettings(arch="yoco-gret", preset="tiny", corpus=[str(corpus)], vocab_size=300, steps=3,
                        batch_size=2, seq_len=32, eval_every=3, save_every=3, val_percent=30.0),
          root / "run", progress=False, log=lambda s: None, data_dir=data_dir)
    return latest_checkpoint(root / "run")


def test_eval_command(tmp_path, capsys):
    checkpoint = tiny_run(tmp_path)
    argv = ["eval", "--checkpoint", str(checkpoint), "--contexts", "160,256", "--depths", "0,1", "--trials", "1",
            "--batches", "2", "--seq-len", "32", "--mqar-samples", "4", "--json", str(tmp_path / "e.json"),
            "--plot", str(tmp_path / "e.png")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["val_loss"] > 0 and len(report["passkey"]) == 4
    assert all(0 <= c["accuracy"] <= 1 for c in report["passkey"]) and 0 <= report["mqar_accuracy"] <= 1
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert report["kv_bits"] == 32
    quantized = argv[:-4] + ["--kv-bits", "8", "--kv-group", "8", "--kv-residual", "16", "--json", str(tmp_path / "q.json")]
    assert main(quantized) == 0
    report8 = json.loads((tmp_path / "q.json").read_text())
    assert report8["kv_bits"] == 8 and len(report8["passkey"]) == 4 and report8["val_loss"] == report["val_loss"]
    assert main(argv[:-4] + ["--kv-bits", "4"]) == 2
    assert "kv group size 32 must divide the value dim 16" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "no held-out token shards" in capsys.readouterr().err
    assert main(argv[:3] + ["--contexts", "40"]) == 2
    assert "too short for the needle" in capsys.readouterr().err
    # beyond max_seq_len (1024 in the tiny preset) and the held-out split: extrapolation, the haystack
    # repeated, both said; a training-free extension put on for the evaluation, and recorded
    capsys.readouterr()
    # 16K: more than the whole corpus (~8K tokens), so the held-out split (which documents hash into it
    # depends on their paths, here under tmp_path) is always repeated
    long = argv[:3] + ["--contexts", "16K", "--depths", "0.5", "--trials", "1", "--batches", "1", "--seq-len", "32",
                       "--mqar-samples", "2", "--rope-extension", "yarn", "--rope-factor", "2",
                       "--rope-original-len", "1024", "--json", str(tmp_path / "long.json")]
    assert main(long) == 0
    out = capsys.readouterr().out
    assert "beyond the model's max_seq_len=1,024: evaluated as extrapolation" in out
    assert "longer contexts repeat it end to end" in out
    report = json.loads((tmp_path / "long.json").read_text())
    cell = report["passkey"][0]
    assert cell["context"] == 16384 and cell["haystack_repeated"] > 1
    assert cell["seconds"] > 0 and cell["peak_rss_bytes"] > 0
    assert report["positions"]["rope_extension"] == "yarn" and report["positions"]["rope_factor"] == 2.0
    assert main(long[:-2] + ["--rope-factor", "1"]) == 2  # a factor of 1 extends nothing
    assert "rope_factor" in capsys.readouterr().err


def test_eval_finds_a_studys_data_and_refuses_shards_of_another_tokenizer(tmp_path, capsys):
    import shutil

    checkpoint = tiny_run(tmp_path, data_dir=tmp_path / "data")  # a study: data/ beside its runs
    argv = ["eval", "--checkpoint", str(tmp_path / "run"), "--contexts", "160", "--depths", "0", "--trials", "1",
            "--batches", "1", "--seq-len", "32", "--mqar-samples", "2", "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "e.json").read_text())["val_loss"] > 0
    # the same shards, but said to be written with a tokenizer that maps text to other ids
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "data", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[300 - 2:300]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(argv + ["--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and str(other) in err and "\n" not in err
    # found by itself, such a folder is passed over for the study's
    shutil.copytree(other, checkpoint.parent / "data")
    assert main(argv) == 0


def test_passkey_heatmap_text_reads_on_dark_and_light_cells():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from yoco.evaluate import passkey_figure

    # RdYlGn: 0% is dark red, 50% pale yellow, 100% dark green
    cells = [{"context": 64, "depth": 0.0, "accuracy": 0.0}, {"context": 128, "depth": 0.0, "accuracy": 0.5},
             {"context": 256, "depth": 0.0, "accuracy": 1.0}]
    fig = passkey_figure(cells, "passkey")
    colours = {text.get_text(): to_rgb(text.get_color()) for text in fig.axes[0].texts}
    assert colours == {"0%": (1, 1, 1), "50%": (0, 0, 0), "100%": (1, 1, 1)}
    plt.close(fig)


def test_text_colour_follows_luminance():
    from yoco.report import text_colour_on

    assert text_colour_on((0.0, 0.0, 0.5, 1.0)) == "white" and text_colour_on((1.0, 1.0, 0.0)) == "black"
    assert text_colour_on((0.1, 0.1, 0.1)) == "white" and text_colour_on((0.9, 0.9, 0.9)) == "black"
