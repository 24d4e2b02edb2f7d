"""Tokenizers. ``ByteTokenizer`` (ids 0..255 are the UTF-8 bytes) needs no training or files, so
any model with a vocabulary of at least 256 can read and write text before a BPE is trained;
``TrainedTokenizer`` wraps the ``tokenizer.json`` that ``yoco train`` saves beside checkpoints."""

from __future__ import annotations

from .models.base import InputError


class ByteTokenizer:
    vocab_size = 256

    def __init__(self, model_vocab_size: int | None = None):
        if model_vocab_size is not None and model_vocab_size < self.vocab_size:
            raise InputError(f"the byte tokenizer needs a vocabulary of at least 256 ids; the model has "
                             f"{model_vocab_size} (pass token ids instead)")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TrainedTokenizer:
    """A checkpoint's ``tokenizer.json`` (byte-level BPE), checked against the model's vocabulary."""

    def __init__(self, path, model_vocab_size: int):
        from .data import EOS, load_tokenizer

        self.tokenizer = load_tokenizer(path, vocab_size=model_vocab_size)
        self.eos_id = self.tokenizer.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def tokenizer_for(checkpoint, model_vocab_size: int):
    """The checkpoint's trained tokenizer when it has one, else the byte tokenizer."""
    from pathlib import Path

    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return TrainedTokenizer(checkpoint, model_vocab_size)
    return ByteTokenizer(model_vocab_size)
