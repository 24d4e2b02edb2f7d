"""Tokenizers. ``ByteTokenizer`` (ids 0..255 are the UTF-8 bytes) needs no training or files, so
any model with a vocabulary of at least 256 can read and write text before a BPE is trained;
``TrainedTokenizer`` wraps the ``tokenizer.json`` that ``yoco train`` saves beside checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .models.base import InputError
from .report import atomic_write


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
    """A checkpoint's ``tokenizer.json`` (byte-level BPE), checked against the model's vocabulary.

    ``exact``: the tokenizer must be the model's own (``check_fits``: the one config.json records, or
    in a folder without that record one of exactly the model's vocabulary, or ``yoco init``'s
    byte-level one). A transformers model may have more ids than its tokenizer (vocabularies padded
    to a multiple, e.g. Qwen2's 151,936 for 151,665 tokens): with ``exact=False`` fewer ids are
    accepted, more never."""

    def __init__(self, path, model_vocab_size: int, exact: bool = True):
        from .data import EOS, load_tokenizer

        self.tokenizer = load_tokenizer(path, vocab_size=model_vocab_size, require_eos=False)
        if exact:
            check_fits(self.tokenizer, path, model_vocab_size)
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


def fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer whatever file wrote it: its size and a hash of its vocabulary (token
    -> id, added tokens included). Saved in config.json beside the model it was trained with."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"ids": tokenizer.get_vocab_size(), "sha256": digest}


def check_fits(tokenizer, folder, model_vocab_size: int) -> None:
    """Refuse a tokenizer that is not the model's: another than the one config.json records (what
    ``yoco train``, ``init`` and ``convert`` write), or, in a folder without that record, one whose size
    is not the model's vocabulary (``yoco train`` sizes the model by its tokenizer), unless it is the
    byte-level tokenizer ``yoco init`` writes beside a random model."""
    from .data import DataError

    wrong = f"wrong tokenizer for this model: put the tokenizer.json it was trained with in {str(folder)!r}"
    size = tokenizer.get_vocab_size()
    config = Path(folder) / "config.json"
    recorded = None
    if config.is_file():
        try:
            recorded = json.loads(config.read_text()).get("tokenizer_fingerprint")
        except ValueError:
            pass  # the model's loader names a corrupt config.json
    if isinstance(recorded, dict) and "ids" in recorded:
        if recorded["ids"] != size:
            raise DataError(f"the tokenizer in {str(folder)!r} has {size} ids but the model was trained with "
                            f"{recorded['ids']}: {wrong}")
        if recorded.get("sha256") != fingerprint(tokenizer)["sha256"]:
            raise DataError(f"the tokenizer in {str(folder)!r} has the {size} ids of the model's but another "
                            f"vocabulary: {wrong}")
    elif size != model_vocab_size and not is_byte_level(tokenizer, model_vocab_size):
        raise DataError(f"the tokenizer in {str(folder)!r} has {size} ids but the model was trained with "
                        f"{model_vocab_size}: {wrong}")


def byte_sized(vocab_size: int) -> bool:
    """Whether a vocabulary is the 256 bytes, with room for the special tokens at most."""
    from .data import SPECIAL_TOKENS

    return 256 <= vocab_size <= 256 + len(SPECIAL_TOKENS)


def is_byte_level(tokenizer, model_vocab_size: int) -> bool:
    """Whether ``tokenizer`` is exactly ``byte_level_tokenizer(model_vocab_size)``."""
    if model_vocab_size < 256 or not byte_sized(tokenizer.get_vocab_size()):
        return False
    return tokenizer.get_vocab(with_added_tokens=True) == \
        byte_level_tokenizer(model_vocab_size).get_vocab(with_added_tokens=True)


def save_tokenizer(tokenizer, directory, model_max_length: int) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` that makes ``AutoTokenizer`` load it as a
    ``PreTrainedTokenizerFast``."""
    atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    write_tokenizer_config(directory, tokenizer, model_max_length)


def write_tokenizer_config(directory, tokenizer, model_max_length: int) -> None:
    """The transformers side of a saved ``tokenizer.json``: its class, special tokens and left padding
    (yoco batches are left-padded)."""
    from .data import EOS, PAD

    special = {name: token for name, token in (("eos_token", EOS), ("pad_token", PAD))
               if tokenizer.token_to_id(token) is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, **special}
    atomic_write(Path(directory) / "tokenizer_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def tokenizer_for(checkpoint, model_vocab_size: int, exact: bool = True):
    """The text side of a model: the folder's tokenizer (checked to be the model's, see
    ``TrainedTokenizer``); for a folder without one, the byte tokenizer only if the model's vocabulary
    is byte-sized (the 256 bytes, and room for the special tokens at most): any other model would read
    bytes as tokens it was never trained on. No folder (a randomly initialised model): bytes."""
    if checkpoint is not None:
        if (Path(checkpoint) / "tokenizer.json").is_file():
            return TrainedTokenizer(checkpoint, model_vocab_size, exact=exact)
        if model_vocab_size > 256 and not byte_sized(model_vocab_size):
            raise InputError(f"{str(checkpoint)!r} has no tokenizer.json and the model's vocabulary of "
                             f"{model_vocab_size} ids is not byte-sized, so text cannot be encoded for it: put "
                             "the tokenizer it was trained with beside it, or give token ids (--prompt-ids)")
    return ByteTokenizer(model_vocab_size)
