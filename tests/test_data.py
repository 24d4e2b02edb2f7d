"""Corpora, the BPE tokenizer and token shards."""

import json

import numpy as np
import pytest
import torch

from yoco.data import (EOS, DataError, TokenShards, build_shards, corpus_documents, in_validation,
                       load_tokenizer, stdlib_sources, train_tokenizer)

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
         "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_stdlib_corpus_is_there():
    files = stdlib_sources()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    first = next(corpus_documents())
    assert first.text.strip() and first.name.endswith(".py")


def test_tokenizer_round_trips_and_keeps_its_size(tokenizer, tmp_path):
    assert tokenizer.get_vocab_size() == 300
    text = "def main():\n    print('héllo ✓')\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: any text survives
    assert tokenizer.token_to_id(EOS) is not None
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text).ids == tokenizer.encode(text).ids


def test_wrong_or_broken_tokenizer(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="wrong tokenizer"):
        load_tokenizer(tmp_path, vocab_size=256)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_folders_files_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.py").write_text("x = 1\n")
    (tmp_path / "a" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "two.txt").write_text("hello\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    docs = list(corpus_documents([tmp_path / "a", tmp_path / "two.txt", tmp_path / "docs.jsonl"]))
    assert [d.text for d in docs] == ["x = 1\n", "hello\n", "first", "second"]


def test_a_folder_of_text_files_without_known_suffixes_is_read(tmp_path):
    from yoco.data import looks_like_text

    (tmp_path / "notes").write_text("plain notes\n")
    (tmp_path / "server.log").write_text("héllo wörld\n" * 1000)  # multi-byte characters, longer than one sniff
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.dat").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: passed over
    docs = list(corpus_documents([tmp_path]))
    assert sorted(d.name.rsplit("/", 1)[-1] for d in docs) == ["notes", "server.log"]
    # a multi-byte character cut by the sniff's end is still text
    (tmp_path / "cut").write_bytes(b"a" * 8191 + "é".encode() + b"\n")
    assert looks_like_text(tmp_path / "cut")


@pytest.mark.parametrize("content,message", [
    ("{not json}\n", "docs.jsonl:1: not valid JSON"),
    (json.dumps({"body": "x"}) + "\n", 'docs.jsonl:1: each JSONL line must be an object with a "text"'),
])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "docs.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        list(corpus_documents([tmp_path / "docs.jsonl"]))


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(corpus_documents([tmp_path / "nowhere"]))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        list(corpus_documents([tmp_path]))


def test_shards_split_by_document_and_batches_repeat(tokenizer, tmp_path):
    docs = [d for _, d in zip(range(60), corpus_documents())]
    meta = build_shards(docs, tokenizer, tmp_path, val_percent=20, progress=False)
    train, val = TokenShards(tmp_path, "train"), TokenShards(tmp_path, "val")
    assert len(train) == meta["tokens"]["train"] > 0 and len(val) == meta["tokens"]["val"] > 0
    assert meta["documents"]["train"] + meta["documents"]["val"] == 60
    assert meta["documents"]["val"] == sum(in_validation(d.name, 20) for d in docs)
    # The shards hold exactly the documents' tokens, each followed by <|endoftext|>.
    eos = tokenizer.token_to_id(EOS)
    expected = [t for d in docs if not in_validation(d.name, 20) for t in tokenizer.encode(d.text).ids + [eos]]
    assert np.array_equal(np.asarray(train.tokens), np.asarray(expected))
    x1, y1 = train.batch(step=7, batch_size=4, seq_len=32, seed=3)
    x2, y2 = train.batch(step=7, batch_size=4, seq_len=32, seed=3)
    x3, _ = train.batch(step=8, batch_size=4, seq_len=32, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (4, 32) and torch.equal(x1[:, 1:], y1[:, :-1])
    batches = list(val.sequential(batch_size=3, seq_len=16, limit=2))
    assert len(batches) <= 2 and batches[0][0].shape[1] == 16


def test_a_corpus_no_document_hashes_into_validation_still_gets_one(tokenizer, tmp_path):
    from yoco.data import Document

    names = [n for n in (f"doc{i}.py" for i in range(200)) if not in_validation(n, 2.0)][:5]
    docs = [Document(n, TEXTS[i]) for i, n in enumerate(names)]
    meta = build_shards(docs, tokenizer, tmp_path / "five", val_percent=2.0, progress=False)
    assert meta["documents"] == {"train": 4, "val": 1}  # the last document is held out
    eos = tokenizer.token_to_id(EOS)
    assert list(TokenShards(tmp_path / "five", "val").tokens) == tokenizer.encode(TEXTS[4]).ids + [eos]
    one = build_shards(docs[:1], tokenizer, tmp_path / "one", val_percent=2.0, progress=False)
    assert one["documents"] == {"train": 1, "val": 0}  # never the only training document
    only_val = next(n for n in (f"v{i}.py" for i in range(500)) if in_validation(n, 2.0))
    alone = build_shards([Document(only_val, TEXTS[0])], tokenizer, tmp_path / "alone", val_percent=2.0,
                         progress=False)
    assert alone["documents"] == {"train": 1, "val": 0}  # hashed into validation, yet the one to train on
    assert len(TokenShards(tmp_path / "alone", "train")) == alone["tokens"]["train"] > 0
    none = build_shards(docs, tokenizer, tmp_path / "none", val_percent=0, progress=False)
    assert none["documents"] == {"train": 5, "val": 0}  # no validation asked for, none made


def test_truncated_or_missing_shards(tokenizer, tmp_path):
    with pytest.raises(DataError, match="not a token shard folder"):
        TokenShards(tmp_path)
    build_shards(corpus_documents([_write(tmp_path / "c.txt", "hello world\n" * 50)]), tokenizer, tmp_path / "s",
                 val_percent=0, progress=False)
    data = (tmp_path / "s" / "train.bin").read_bytes()
    (tmp_path / "s" / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="missing or truncated"):
        TokenShards(tmp_path / "s")
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenShards(tmp_path / "s", "val").batch(0, 1, 8)


def _write(path, text):
    path.write_text(text)
    return path


def test_validation_is_filled_to_one_row_from_the_latest_training_documents(tokenizer, tmp_path):
    """A 3-token document hashed into validation (the small-corpus case): the latest training documents
    join it until validation holds min_val_tokens, in their order, and training keeps the rest."""
    from yoco.data import Document

    tiny_val = next(n for n in (f"v{i}.py" for i in range(500)) if in_validation(n, 2.0))
    names = [n for n in (f"doc{i}.py" for i in range(200)) if not in_validation(n, 2.0)][:5]
    docs = [Document(n, TEXTS[i]) for i, n in enumerate(names)] + [Document(tiny_val, "x=1")]
    eos = tokenizer.token_to_id(EOS)
    encoded = [tokenizer.encode(TEXTS[i]).ids + [eos] for i in range(5)]
    tiny = tokenizer.encode("x=1").ids + [eos]
    need = len(tiny) + len(encoded[4]) + len(encoded[3]) + 1  # three training documents must move
    meta = build_shards(docs, tokenizer, tmp_path / "d", val_percent=2.0, min_val_tokens=need, progress=False)
    val = list(TokenShards(tmp_path / "d", "val").tokens)
    assert len(val) >= need and meta["documents"] == {"train": 2, "val": 4}
    assert val == tiny + encoded[2] + encoded[3] + encoded[4]
    assert list(TokenShards(tmp_path / "d", "train").tokens) == encoded[0] + encoded[1]
