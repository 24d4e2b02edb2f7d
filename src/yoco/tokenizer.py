"""Tokenizers. ``ByteTokenizer`` (ids 0..255 are the UTF-8 bytes) needs no training or files, so
any model with a vocabulary of at least 256 can read and write text before a BPE is trained;
``TrainedTokenizer`` wraps the ``tokenizer.json`` that ``yoco train`` saves beside checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

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

        self.tokenizer = load_tokenizer(path, vocab_size=model_vocab_size, require_eos=False)
        self.eos_id = self.tokenizer.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer(model_vocab_size: int):
    """A ``tokenizers`` byte-level tokenizer with no merges: ids 0..255 are the UTF-8 bytes (as
    ``ByteTokenizer``), then the special tokens when the vocabulary has room for them. What ``yoco
    init`` saves beside a model that has no trained tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from .data import SPECIAL_TOKENS

    if model_vocab_size < 256:
        raise InputError(f"a byte-level tokenizer needs a vocabulary of at least 256 ids; the model has "
                         f"{model_vocab_size}")
    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if model_vocab_size >= 256 + len(SPECIAL_TOKENS):
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tokenizer(tokenizer, directory, model_max_length: int) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` that makes ``AutoTokenizer`` load it as a
    ``PreTrainedTokenizerFast``."""
    from .checkpoint import atomic_write

    atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    write_tokenizer_config(directory, tokenizer, model_max_length)


def write_tokenizer_config(directory, tokenizer, model_max_length: int) -> None:
    """The transformers side of a saved ``tokenizer.json``: its class, special tokens and left padding
    (yoco batches are left-padded)."""
    from .checkpoint import atomic_write
    from .data import EOS, PAD

    special = {name: token for name, token in (("eos_token", EOS), ("pad_token", PAD))
               if tokenizer.token_to_id(token) is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, **special}
    atomic_write(Path(directory) / "tokenizer_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def tokenizer_for(checkpoint, model_vocab_size: int):
    """The checkpoint's trained tokenizer when it has one, else the byte tokenizer."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return TrainedTokenizer(checkpoint, model_vocab_size)
    return ByteTokenizer(model_vocab_size)
