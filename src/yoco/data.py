"""Text corpora, a byte-level BPE tokenizer, and memory-mapped token shards.

- ``corpus_documents(paths)``: documents from files, folders (recursively) or JSONL files (one JSON
  object with a ``"text"`` field per line); with no paths, the Python standard library's own ``.py``
  sources, a real corpus present on every machine with no download.
- ``train_tokenizer``: a byte-level BPE (``tokenizers``) with ``<|endoftext|>`` and ``<|pad|>``,
  saved as the standard ``tokenizer.json``.
- ``build_shards``: tokenizes every document once into ``train.bin`` / ``val.bin`` (flat token
  arrays, documents separated by ``<|endoftext|>``) plus ``meta.json``; the split is by document, by
  a stable hash of its name, so it does not depend on the order files are found (when the documents
  hashed into validation hold less than one validation row, the last training documents are held
  out too).
- ``TokenShards``: memory-maps a split and draws batches that depend only on (seed, step), so a run
  resumed at step k sees exactly the batches an uninterrupted run sees from step k on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import YocoError
from .report import atomic_write

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".html", ".toml", ".cfg", ".ini"}


class DataError(YocoError, ValueError):
    """A corpus, tokenizer or shard problem; the message names the file and the reason."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# ---------------------------------------------------------------------- corpora
def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files (site-packages and caches excluded), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts and "__pycache__" not in p.parts]
    return sorted(files)


def _read_jsonl(path: Path) -> Iterator[Document]:
    """The documents of a JSONL file: one object with a "text" string per line (blank lines skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: each JSONL line must be an object with a "text" string')
            yield Document(f"{path}:{number}", record["text"])


def looks_like_text(path: Path, sniff: int = 8192) -> bool:
    """Whether a file of no known text suffix holds text: its first ``sniff`` bytes have no NUL and
    decode as UTF-8 (a character cut at the end aside)."""
    try:
        with open(path, "rb") as f:
            head = f.read(sniff)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and len(head) == sniff  # only the cut last character is bad
    return True


def files_under(path: Path) -> list[Path]:
    """A folder's text files: those of a known text suffix, and those of any other (or none) that hold
    text (``looks_like_text``: plain text saved as ``notes``, ``LICENSE``, ``.log``...); binaries and
    caches are passed over."""
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix.lower() in TEXT_SUFFIXES or looks_like_text(p)))


def corpus_documents(paths: Sequence[str | os.PathLike] | None = None, *, jsonl: bool = False) -> Iterator[Document]:
    """Every document of the corpus (``jsonl``: every file read as JSONL, whatever its name); raises
    DataError for a missing path or a corpus with no text."""
    if not paths:
        files = stdlib_sources()
        if not files:
            raise DataError(f"no Python sources found under {sysconfig.get_paths()['stdlib']!r}")
    else:
        files = []
        for raw in paths:
            path = Path(raw)
            if not path.exists():
                raise DataError(f"corpus path {str(path)!r} does not exist")
            files.extend(files_under(path) if path.is_dir() else [path])
    found = False
    for path in files:
        if jsonl or path.suffix.lower() == ".jsonl":
            for doc in _read_jsonl(path):
                if doc.text.strip():
                    found = True
                    yield doc
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            found = True
            yield Document(str(path), text)
    if not found:
        raise DataError(f"the corpus {[str(p) for p in paths] if paths else 'stdlib'} holds no text")


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on `texts` (any byte sequence stays encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} ids (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None, require_eos: bool = True):
    """A ``tokenizer.json``; with `vocab_size`, checks that it fits a model of that vocabulary. Data
    work needs the end-of-text token (`require_eos`); reading a model's text does not."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{str(path)!r} is not a valid tokenizer.json ({e})") from None
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer {str(path)!r} has {tokenizer.get_vocab_size()} tokens but the model's "
                        f"vocabulary is {vocab_size}: wrong tokenizer for this model")
    if require_eos and tokenizer.token_to_id(EOS) is None:
        raise DataError(f"tokenizer {str(path)!r} has no {EOS} token")
    return tokenizer


# ---------------------------------------------------------------------- shards
def in_validation(name: str, val_percent: float) -> bool:
    """A stable, order-independent split by document name."""
    digest = hashlib.sha256(name.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:4], "little") % 10_000 < val_percent * 100


def build_shards(documents: Iterable[Document], tokenizer, out_dir: str | os.PathLike, *,
                 val_percent: float = 2.0, min_val_tokens: int = 1, batch_docs: int = 256,
                 progress: bool = True, eos_id: int | None = None) -> dict:
    """Tokenize every document once into ``train.bin`` / ``val.bin`` + ``meta.json`` in `out_dir`, each
    followed by the end-of-text id (``eos_id``; default the tokenizer's ``<|endoftext|>``: a
    transformers model's tokenizer names its own).

    Validation gets the documents whose name hashes into ``val_percent``; when they hold fewer than
    ``min_val_tokens`` tokens (one validation row: a small corpus may hash nothing, or a 3-token file,
    into it), the latest training documents are moved there until it does, as long as one training
    document remains. Whether it then holds a row is for the caller to check (``TokenShards``)."""
    from collections import deque

    from tqdm import tqdm

    if not 0 <= val_percent < 100:
        raise DataError(f"val_percent={val_percent} must be within [0, 100)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.token_to_id(EOS) if eos_id is None else eos_id
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token: give the end-of-text id")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    tmp = {split: out / f".{split}.bin.tmp" for split in counts}
    files = {split: open(tmp[split], "wb") for split in counts}
    want_val = min_val_tokens if val_percent > 0 else 0
    try:
        batch: list[Document] = []
        # The latest training documents, written late: enough of them to fill validation at the end.
        held: deque[np.ndarray] = deque()
        held_tokens = 0

        def write(split: str, ids: np.ndarray) -> None:
            files[split].write(ids.tobytes())
            counts[split] += len(ids)
            docs[split] += 1

        def flush() -> None:
            nonlocal held_tokens
            encodings = tokenizer.encode_batch([d.text for d in batch])
            for doc, enc in zip(batch, encodings):
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                if in_validation(doc.name, val_percent):
                    write("val", ids)
                    continue
                held.append(ids)
                held_tokens += len(ids)
                while len(held) > 1 and held_tokens - len(held[0]) >= want_val:
                    held_tokens -= len(held[0])
                    write("train", held.popleft())
            batch.clear()

        for doc in tqdm(documents, desc="tokenizing", unit="doc", disable=not progress):
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
        moved = []
        while held and counts["val"] + sum(map(len, moved)) < want_val and docs["train"] + len(held) > 1:
            moved.append(held.pop())
        for ids in held:
            write("train", ids)
        for ids in reversed(moved):
            write("val", ids)
    finally:
        for f in files.values():
            f.close()
    if counts["train"] == 0 and counts["val"] > 0:
        # every document hashed into validation (a corpus of one or two): training comes first, so they
        # all train, and validation is empty (which the trainer then reports)
        tmp["train"].unlink()
        tmp["val"].rename(tmp["train"])
        tmp["val"].touch()
        counts, docs = {"train": counts["val"], "val": 0}, {"train": docs["val"], "val": 0}
    if counts["train"] == 0:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise DataError("the corpus produced no training tokens")
    for split, path in tmp.items():
        os.replace(path, out / f"{split}.bin")
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos, "tokens": counts,
            "documents": docs, "val_percent": val_percent}
    atomic_write(out / "meta.json", lambda t: Path(t).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


class TokenShards:
    """One split of a shard folder, memory-mapped."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{str(meta_path)!r} is missing: not a token shard folder (build one with build_shards)")
        try:
            self.meta = json.loads(meta_path.read_text())
            expected = self.meta["tokens"][split]
            dtype = np.dtype(self.meta["dtype"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{str(meta_path)!r} is corrupt ({e})") from None
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
            raise DataError(f"{str(path)!r} is missing or truncated: meta.json says {expected} tokens")
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
        self.split = split

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [batch_size, seq_len]: random windows chosen by (seed, step) alone."""
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"the {self.split} split has {len(self.tokens)} tokens, fewer than one sequence of "
                            f"{seq_len} + 1")
        generator = np.random.default_rng([seed, step])
        starts = generator.integers(0, len(self.tokens) - seq_len, size=batch_size)
        windows = np.stack([np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        data = torch.from_numpy(windows)
        return data[:, :-1], data[:, 1:]

    def sequential(self, batch_size: int, seq_len: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows in order (validation): at most `limit` batches."""
        n = (len(self.tokens) - 1) // seq_len
        for b, first in enumerate(range(0, n, batch_size)):
            if limit is not None and b >= limit:
                return
            rows = [np.asarray(self.tokens[j * seq_len:(j + 1) * seq_len + 1], dtype=np.int64)
                    for j in range(first, min(n, first + batch_size))]
            data = torch.from_numpy(np.stack(rows))
            yield data[:, :-1], data[:, 1:]



def is_shard_folder(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds token shards (``build_shards`` writes their meta.json last)."""
    return (Path(directory) / "meta.json").is_file()


def find_shards(model_folder: str | os.PathLike, levels_up: int = 0) -> Path:
    """The token shard folder a model was trained on: ``data/`` beside the model folder (a training
    run keeps it beside its checkpoints) or, with `levels_up`, that many folders further up (a study
    keeps one for all its runs), the nearest that holds shards; when none does, the one beside it,
    for the caller to name in its error."""
    parent = Path(model_folder).resolve().parent
    candidates = [parent / "data"]
    for _ in range(levels_up):
        parent = parent.parent
        candidates.append(parent / "data")
    return next((folder for folder in candidates
                 if is_shard_folder(folder) and same_tokenizer(folder, model_folder) is not False), candidates[0])


def same_tokenizer(a: str | os.PathLike, b: str | os.PathLike) -> bool | None:
    """Whether folders ``a`` and ``b`` hold the same ``tokenizer.json`` (its model and added tokens: the
    ids text becomes); None when either holds none or one that cannot be read."""
    def essence(folder):
        try:
            spec = json.loads((Path(folder) / "tokenizer.json").read_text())
        except (OSError, ValueError):
            return None
        return (spec.get("model"), spec.get("added_tokens")) if isinstance(spec, dict) else None

    ea, eb = essence(a), essence(b)
    return None if ea is None or eb is None else ea == eb


__all__ = ["DataError", "Document", "EOS", "PAD", "TokenShards", "build_shards", "corpus_documents", "find_shards",
           "is_shard_folder", "load_tokenizer", "same_tokenizer", "stdlib_sources", "train_tokenizer"]
