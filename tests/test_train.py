"""Training: the loss falls, checkpoints are complete, and resume continues exactly."""

import json
import re

import pytest
import torch

from yoco.checkpoint import CheckpointError
from yoco.train import TrainSettings, latest_checkpoint, lr_factor, train


def settings(corpus, **changes):
    values = dict(arch="yoco-swa", preset="tiny", corpus=[corpus], vocab_size=300, steps=6, batch_size=2,
                  seq_len=32, lr=3e-3, warmup=2, eval_every=3, eval_batches=2, save_every=3, log_every=1,
                  val_percent=20.0)
    values.update(changes)
    return TrainSettings(**values)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lr_schedule():
    assert lr_factor(0, 4, 100, 0.1) == 0.25 and lr_factor(3, 4, 100, 0.1) == 1.0
    assert lr_factor(100, 4, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(50, 4, 100, 0.1) < 1.0


@pytest.mark.parametrize("arch", ["yoco-swa", "yoco-gret", "mla", "block"])
def test_loss_falls_and_checkpoints_load(arch, corpus, tmp_path):
    final = train(settings(corpus, arch=arch, steps=12, save_every=6), tmp_path, progress=False, log=lambda s: None)
    by_step = losses(tmp_path)
    assert by_step[12] < by_step[1]
    assert final["val_loss"] > 0
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "checkpoint-12"
    assert {p.name for p in checkpoint.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                                 "trainer.pt"}
    assert not list(tmp_path.glob(".checkpoint-*"))  # no staging folder left


def test_resume_continues_exactly(corpus, tmp_path):
    whole = tmp_path / "whole"
    train(settings(corpus), whole, progress=False, log=lambda s: None)
    parted = tmp_path / "parted"
    train(settings(corpus), parted, progress=False, log=lambda s: None, stop_after=3)
    assert latest_checkpoint(parted).name == "checkpoint-3"
    train(settings(corpus), parted, resume=True, progress=False, log=lambda s: None)
    a, b = losses(whole), losses(parted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def test_activation_checkpointing_trains_the_same_run(corpus, tmp_path, monkeypatch):
    train(settings(corpus, steps=3), tmp_path / "plain", progress=False, log=lambda s: None)
    train(settings(corpus, steps=3, activation_checkpointing=True), tmp_path / "checkpointed", progress=False,
          log=lambda s: None)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "checkpointed")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    # the command's flag reaches the settings
    import yoco.commands.train as command
    from yoco.cli import main

    seen = []
    monkeypatch.setattr(command, "train", lambda s, out, resume: seen.append(s) or {})
    assert main(["train", "--out", str(tmp_path / "x"), "--activation-checkpointing"]) == 0
    assert seen[0].activation_checkpointing is True


def test_resume_with_another_architecture_is_refused(corpus, tmp_path):
    train(settings(corpus, steps=3), tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(CheckpointError, match="config differs"):
        train(settings(corpus, arch="transformer", steps=6), tmp_path, resume=True, progress=False, log=lambda s: None)


def test_bad_settings(corpus, tmp_path):
    with pytest.raises(ValueError, match="batch-size"):
        train(settings(corpus, batch_size=0), tmp_path, progress=False, log=lambda s: None)


def test_train_cli(corpus, tmp_path, capsys):
    from yoco.cli import main

    argv = ["train", "--arch", "mqa", "--data", corpus, "--out", str(tmp_path), "--vocab-size", "300", "--steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--save-every", "2"]
    assert main(argv) == 0
    assert "step 4" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(argv[:-4] + ["--batch-size", "0"]) == 2


def test_existing_run_is_not_overwritten(corpus, tmp_path):
    train(settings(corpus, steps=3), tmp_path, progress=False, log=lambda s: None)
    before = (tmp_path / "checkpoint-3" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(settings(corpus, steps=3, seed=1), tmp_path, progress=False, log=lambda s: None)
    assert (tmp_path / "checkpoint-3" / "model.safetensors").read_bytes() == before


def test_generate_uses_the_checkpoint_tokenizer_and_rejects_a_wrong_one(corpus, tmp_path, capsys):
    import shutil

    from yoco.cli import main
    from yoco.data import train_tokenizer

    train(settings(corpus, steps=3), tmp_path, progress=False, log=lambda s: None)
    checkpoint = latest_checkpoint(tmp_path)
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "def f1(x):", "--max-new-tokens", "5"]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    wide = train_tokenizer([f"name{i} = value{i * 7} + other{i % 13}\n" for i in range(3000)], vocab_size=400)
    assert wide.get_vocab_size() == 400  # more ids than the checkpoint's 300-token model knows
    wide.save(str(bad / "tokenizer.json"))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "def", "--max-new-tokens", "2"]) == 2
    assert "wrong tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one_process(mode, corpus, tmp_path):
    """torchrun with 2 gloo processes (each half of every global batch, averaged gradients; replicated
    with DDP or sharded with FSDP2) gives the single process's loss trajectory on the same batches."""
    import os
    import subprocess
    import sys

    flags = ["--arch", "yoco-swa", "--data", corpus, "--vocab-size", "300", "--steps", "5", "--batch-size", "4",
             "--seq-len", "32", "--eval-every", "5", "--save-every", "5", "--log-every", "1", "--warmup", "2",
             # Retrieval rows are the batch's first rows, so the two processes' shares of the loss differ;
             # the first two steps run the curriculum's 8 rows of 16 tokens.
             "--retrieval-mix", "0.5", "--short-seq-len", "16", "--short-steps", "2"]
    from yoco.cli import main

    assert main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "yoco.train", *flags, "--parallel", mode, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-4), step
    assert latest_checkpoint(tmp_path / "two").name == "checkpoint-5"
    # The checkpoint holds full tensors: the same model as the single process's, up to reduction order.
    from yoco import load_model

    a, b = load_model(latest_checkpoint(tmp_path / "one")), load_model(latest_checkpoint(tmp_path / "two"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=name)


def test_retrieval_rows(corpus, tmp_path):
    from yoco.data import load_tokenizer
    from yoco.tasks import retrieval_rows

    train(settings(corpus, steps=1), tmp_path, progress=False, log=lambda s: None)
    tokenizer = load_tokenizer(tmp_path / "data")
    from yoco.data import TokenShards

    haystack = TokenShards(tmp_path / "data").tokens
    rows, targets = retrieval_rows(4, 192, step=5, seed=0, tokenizer=tokenizer, haystack=haystack)
    assert rows.shape == targets.shape == (4, 193) and targets.dtype == torch.bool
    again = retrieval_rows(4, 192, 5, 0, tokenizer, haystack)
    assert torch.equal(rows, again[0]) and torch.equal(targets, again[1])
    assert not torch.equal(rows, retrieval_rows(4, 192, 6, 0, tokenizer, haystack)[0])
    text = tokenizer.decode(rows[0].tolist())
    key = text.split("The pass key is ")[1][:5]
    assert text.endswith("The pass key is " + key)  # the passkey row ends with its answer
    assert text.count("What is the pass key?") >= 1 and text.count(" The pass key is " + key + ".") == 1  # one needle
    # The passkey row's targets are exactly its answers: the key after every question.
    answer = tokenizer.encode(" " + key).ids
    assert tokenizer.decode(rows[0, targets[0]].tolist()) == (" " + key) * text.count("What is the pass key?")
    assert targets[0, -len(answer):].all() and targets[0].sum() % len(answer) == 0
    # The copy row's targets are its repeat after the first repeated token, which occurs earlier too.
    repeat = rows[1, targets[1]].tolist()
    first = targets[1].nonzero()[0].item()
    earlier = rows[1, :first - 1].tolist()
    assert any(earlier[i:i + len(repeat) + 1] == rows[1, first - 1:first + len(repeat)].tolist()
               for i in range(len(earlier)))
    # Too short for a needle: every row is MQAR (keys then queried keys, each followed by its value).
    short, short_targets = retrieval_rows(2, 15, step=0, seed=0, tokenizer=tokenizer, haystack=haystack)
    assert short.shape == (2, 16)
    pairs = {int(short[0, i]): int(short[0, i + 1]) for i in range(0, 8, 2)}
    assert all(pairs[int(short[0, i])] == int(short[0, i + 1]) for i in range(8, 16, 2))
    assert short_targets[0].nonzero().flatten().tolist() == [9, 11, 13, 15]  # the queried values


def test_loss_weights_give_every_row_its_share_and_retrieval_rows_only_to_their_targets():
    from yoco.train import loss_weights

    targets = torch.zeros(2, 6, dtype=torch.bool)
    targets[0, 3:] = True
    targets[1, 1] = True
    weights = loss_weights(4, 6, targets)
    assert weights.shape == (4, 6) and weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(weights.sum(1), torch.full((4,), 0.25))
    assert torch.all(weights[2:] == 1 / 24) and torch.equal(weights[:2] > 0, targets)
    assert weights[0, 3].item() == pytest.approx(1 / 12) and weights[1, 1].item() == pytest.approx(0.25)
    plain = loss_weights(4, 6, torch.zeros(0, 6, dtype=torch.bool))  # no retrieval rows: the mean
    assert torch.allclose(plain, torch.full((4, 6), 1 / 24))


def test_copy_row_repeats_one_span_later():
    import random

    from yoco.tasks import copy_row

    haystack = list(range(10_000, 12_000))  # distinct tokens: any repeat is the copied span
    for seed in range(50):
        row, targets = copy_row(haystack, 257, random.Random(seed))
        assert len(row) == 257
        repeated = [i for i, t in enumerate(row) if row.index(t) != i]  # positions of second occurrences
        first = [row.index(row[i]) for i in repeated]
        span = len(repeated)
        assert 4 <= span <= 64 and repeated == list(range(repeated[0], repeated[0] + span))
        assert first == list(range(first[0], first[0] + span)) and first[-1] < repeated[0]
        assert row[:repeated[0]] == haystack[row[0] - 10_000:][:repeated[0]]  # corpus text before the repeat
        assert targets == repeated[1:]  # the repeat's first token is not predictable, the rest are
    assert copy_row(haystack[:100], 257, random.Random(0)) is None


def test_training_with_a_retrieval_mix_resumes_exactly(corpus, tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    s = settings(corpus, retrieval_mix=0.5, seq_len=96)
    train(s, whole, progress=False, log=lambda t: None)
    train(s, parted, progress=False, log=lambda t: None, stop_after=3)
    train(s, parted, resume=True, progress=False, log=lambda t: None)
    a, b = losses(whole), losses(parted)
    assert all(b[k] == pytest.approx(a[k], abs=1e-6) for k in a)
    with pytest.raises(ValueError, match="retrieval-mix"):
        train(settings(corpus, retrieval_mix=1.5), tmp_path / "x", progress=False, log=lambda t: None)


def test_sequence_length_curriculum(corpus, tmp_path):
    s = settings(corpus, retrieval_mix=0.5, seq_len=96, short_seq_len=32, short_steps=4)
    assert [s.shape(step) for step in (0, 3, 4, 5)] == [(6, 32), (6, 32), (2, 96), (2, 96)]  # same tokens per step
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    train(s, whole, progress=False, log=lambda t: None)
    train(s, parted, progress=False, log=lambda t: None, stop_after=3)  # stops inside the short phase
    train(s, parted, resume=True, progress=False, log=lambda t: None)
    a, b = losses(whole), losses(parted)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and all(b[k] == pytest.approx(a[k], abs=1e-6) for k in a)
    plain = tmp_path / "plain"
    train(settings(corpus, retrieval_mix=0.5, seq_len=96), plain, progress=False, log=lambda t: None)
    assert losses(plain)[1] != pytest.approx(a[1], abs=1e-6)  # the short rows are other batches
    for bad, message in [(dict(short_seq_len=96), "short-seq-len"), (dict(short_seq_len=50), "short-seq-len"),
                         (dict(short_seq_len=32, short_steps=0), "short-steps"),
                         (dict(short_seq_len=32, short_steps=7), "short-steps"), (dict(short_steps=2), "short-steps"),
                         (dict(retrieval_tasks=("passkey", "recall")), "retrieval-tasks"),
                         (dict(retrieval_tasks=()), "retrieval-tasks")]:
        with pytest.raises(ValueError, match=message):
            train(settings(corpus, seq_len=96, **bad), tmp_path / "x", progress=False, log=lambda t: None)


def test_retrieval_tasks_choose_the_kinds_of_rows(corpus, tmp_path):
    from yoco.data import TokenShards, load_tokenizer
    from yoco.tasks import retrieval_rows

    train(settings(corpus, steps=1), tmp_path, progress=False, log=lambda s: None)
    tokenizer, haystack = load_tokenizer(tmp_path / "data"), TokenShards(tmp_path / "data").tokens
    rows, targets = retrieval_rows(3, 192, 0, 0, tokenizer, haystack, tasks=("passkey",))
    assert all("What is the pass key?" in tokenizer.decode(row.tolist()) for row in rows)
    rows, targets = retrieval_rows(2, 192, 0, 0, tokenizer, haystack, tasks=("mqar",))
    assert all(t.tolist() == list(range(2 * 48 + 1, 4 * 48, 2)) for t in (m.nonzero().flatten() for m in targets))


def test_init_from_starts_from_a_checkpoints_weights(corpus, tmp_path):
    from yoco.checkpoint import load_model

    train(settings(corpus, steps=3), tmp_path / "a", progress=False, log=lambda t: None)
    a = load_model(latest_checkpoint(tmp_path / "a"))
    # A new schedule at another length, from a's weights; lr ~ 0 so the weights stay a's.
    train(settings(corpus, steps=1, seq_len=48, lr=1e-12, warmup=0, init_from=str(tmp_path / "a")), tmp_path / "b",
          progress=False, log=lambda t: None)
    b = load_model(latest_checkpoint(tmp_path / "b"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    with pytest.raises(CheckpointError, match="its model differs: arch='yoco-swa'"):
        train(settings(corpus, arch="yoco-gret", init_from=str(tmp_path / "a")), tmp_path / "c", progress=False,
              log=lambda t: None)
    (latest_checkpoint(tmp_path / "a") / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train(settings(corpus, init_from=str(tmp_path / "a")), tmp_path / "d", progress=False, log=lambda t: None)


def test_a_training_checkpoint_is_a_transformers_folder(corpus, tmp_path, capsys):
    import yoco  # noqa: F401  (registers the model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from yoco.checkpoint import load_model
    from yoco.cli import main
    from yoco.data import load_tokenizer

    train(settings(corpus, steps=2, save_every=2), tmp_path / "run", progress=False, log=lambda s: None)
    checkpoint = latest_checkpoint(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "def f(x):\n    return x"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == load_tokenizer(checkpoint).encode(text).ids
    assert model.config.eos_token_id == tokenizer.eos_token_id == load_tokenizer(checkpoint).token_to_id("<|endoftext|>")
    torch.testing.assert_close(model(ids).logits, load_model(checkpoint)(ids), rtol=0, atol=1e-6)
    # A folder written by save_pretrained works with yoco eval and generate.
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--data", str(tmp_path / "run" / "data"),
                 "--contexts", "128", "--depths", "0", "--trials", "1", "--batches", "1", "--seq-len", "32",
                 "--batch-size", "2", "--mqar-samples", "2"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "def", "--max-new-tokens", "3"]) == 0


def test_a_corpus_too_small_for_a_validation_row_is_refused_and_no_json_holds_nan(tmp_path, capsys):
    from yoco.cli import main
    from yoco.report import json_text

    small = tmp_path / "small"
    small.mkdir()
    (small / "a.py").write_text("def f(x):\n    return x\n" * 30)  # one document: nothing to hold out
    argv = ["train", "--data", str(small), "--out", str(tmp_path / "run"), "--vocab-size", "300", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "fewer than one row of seq-len + 1 = 33" in err and "Traceback" not in err
    assert json_text({"a": float("nan"), "b": [1.0, float("inf")]}, indent=None) == '{"a": null, "b": [1.0, null]}'


def test_validation_covers_a_named_slice_and_metrics_are_strict_json(corpus, tmp_path, capsys):
    from yoco.cli import main

    argv = ["train", "--data", corpus, "--out", str(tmp_path), "--vocab-size", "300", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--save-every", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # a validation split of a few rows: the whole of it, rows of 32 (its BPE's token count varies a little)
    found = re.search(r"val loss \d\.\d{4} over the whole held-out split \((\d+) of its (\d+) tokens in whole rows\)",
                      out)
    assert found, out
    scored, held_out = map(int, found.groups())
    assert scored == (held_out - 1) // 32 * 32 > 0
    assert f"over at most 8 batches of 2 x 32 tokens from the start of the held-out split ({held_out} tokens)" in out

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))

    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert val and (val[-1]["val_tokens"], val[-1]["val_split_tokens"]) == (scored, held_out)
