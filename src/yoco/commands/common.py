"""What several commands share: the options that choose a model, the dtype and the seed, the
``--arch`` list, the training options of ``yoco train`` and ``yoco study``, and the error a request
that cannot be carried out raises."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..arguments import NATURAL, POSITIVE, POSITIVE_INT, ListOf, kv_bit_width, names, quantized_bit_width
from ..checkpoint import load_model, resolve_checkpoint
from ..data import (EOS, DataError, TokenShards, build_shards, corpus_documents, files_under, find_shards,
                    is_shard_folder, load_tokenizer, same_tokenizer)
from ..config import ATTN_TEMPERATURES, GLOBAL_POSITIONS, NAMES, POSITION_FIELDS, PRESETS, ROPE_EXTENSIONS
from ..errors import YocoError
from ..models import CausalLM, build_model
from ..quantize import DEFAULT_GROUP, DEFAULT_RESIDUAL, KVQuantization
from ..tasks import RETRIEVAL_TASKS


class UsageError(YocoError, ValueError):
    """A command-line request that cannot be carried out (no prompt, no data, conflicting options)."""


# ---------------------------------------------------------------------- the model
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=NAMES, default="yoco-swa", help="architecture of a randomly initialised model")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size preset of that model")
    p.add_argument("--checkpoint", help="a saved model folder (config.json + model.safetensors), or a training run "
                                        "folder for its latest checkpoint; overrides --arch/--preset")
    add_dtype(p)
    add_seed(p, "seed for random initialisation and sampling")


def load_from_args(args: argparse.Namespace) -> CausalLM:
    """The model ``add_model_args``' options choose."""
    if args.checkpoint:
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a run folder: its latest checkpoint
        return load_model(args.checkpoint, dtype=args.dtype)
    return build_model(args.arch, preset=args.preset, dtype=args.dtype, seed=args.seed)


def held_out_shards(model_folder: str, data: str | None) -> Path:
    """The token shards to evaluate the model in ``model_folder`` on: ``data`` (``--data``), or the
    ``data/`` its training run keeps beside its checkpoints, or its study's a level up, whichever is
    nearest and was written with the model's tokenizer. Refused, naming the folder, when it holds no
    shards or shards of another tokenizer (their ids would mean other text to the model)."""
    folder = Path(data) if data else find_shards(model_folder, levels_up=1)
    if not is_shard_folder(folder):
        raise UsageError(f"no held-out token shards at {str(folder)!r}: pass --data with a token shard folder "
                         "written with this model's tokenizer")
    if same_tokenizer(folder, model_folder) is False:
        raise UsageError(f"the token shards at {str(folder)!r} were written with another tokenizer than the model's "
                         f"({str(model_folder)!r}): pass --data with shards written with this model's tokenizer")
    return folder


def config_eos_token_id(model_folder: str | Path):
    """The ``eos_token_id`` a model folder's config.json names, as written there (an int, or a list of
    them in some transformers configs), or None where it names none or cannot be read."""
    try:
        return json.loads((Path(model_folder) / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None


def held_out_split(data: Path, needed: int) -> TokenShards:
    """The held-out tokens of a shard folder: its validation split, or its training split where the
    validation one holds fewer than ``needed`` (``--text`` shards keep every token in one split)."""
    val = TokenShards(data, "val")
    return val if len(val) >= needed else TokenShards(data, "train")


def end_of_text_id(model_folder: str | Path, tokenizer) -> int:
    """The id a model reads as the end of a document: the tokenizer's ``<|endoftext|>`` (yoco's), else the
    ``eos_token_id`` of a transformers folder's config.json (the first, if a list)."""
    eos = tokenizer.token_to_id(EOS)
    if eos is not None:
        return eos
    eos = config_eos_token_id(model_folder)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise UsageError(f"{str(model_folder)!r} names no end-of-text token (no {EOS} in its tokenizer, no "
                         "eos_token_id in its config.json): its text cannot be split into documents")
    return eos


def text_shards(model_folder: str | Path, text: str | None, jsonl: str | None, cache_root: str | Path) -> Path:
    """Token shards of the given text (``--text``: a file or a folder of text files, a ``.jsonl`` among
    them read by line; ``--jsonl``: one JSONL file whatever its name) written with the model's own
    tokenizer, every token in one split. Built once into ``cache_root/.yoco-text-shards/KEY`` and reused:
    the key covers the tokenizer, its end-of-text id and each file's path, size and modification time,
    so changed text or another model's tokenizer builds anew."""
    folder = Path(model_folder)
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"{str(folder)!r} has no tokenizer.json: --text needs the model's tokenizer")
    tokenizer = load_tokenizer(folder, require_eos=False)
    eos = end_of_text_id(folder, tokenizer)
    source = Path(jsonl if jsonl is not None else text)
    if not source.exists():
        raise UsageError(f"{'--jsonl' if jsonl is not None else '--text'} path {str(source)!r} does not exist")
    if jsonl is not None and not source.is_file():
        raise UsageError(f"--jsonl {str(source)!r} is not a file")
    files = files_under(source) if source.is_dir() else [source]
    key = hashlib.sha256((folder / "tokenizer.json").read_bytes())
    key.update(f"{eos}:{jsonl is not None}".encode())
    for path in files:
        stat = path.stat()
        key.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    out = Path(cache_root) / ".yoco-text-shards" / key.hexdigest()[:20]
    if is_shard_folder(out):
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        build_shards(corpus_documents([source], jsonl=jsonl is not None), tokenizer, partial, val_percent=0,
                     eos_id=eos)
    except DataError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)  # whole or absent: a folder with meta.json is a finished build
    return out


def add_kv_quantization(p: argparse.ArgumentParser, many: bool = False) -> None:
    """``--kv-bits`` (one width, or with ``many`` a list in which 32 and 16 mean unquantized), and the
    group size and full-precision residual of the quantized K/V caches (``yoco.quantize``)."""
    if many:
        p.add_argument("--kv-bits", type=ListOf(kv_bit_width, "bit widths"), action="extend",
                       help="K/V cache bit widths to compare, e.g. 32,8,4,2 (32 or 16: unquantized, in the "
                            "--dtype; default: unquantized only)")
    else:
        p.add_argument("--kv-bits", type=quantized_bit_width,
                       help="store the growing K/V caches in this many bits (KIVI: keys per channel, values per "
                            "token; default: unquantized)")
    p.add_argument("--kv-group", type=POSITIVE_INT, default=DEFAULT_GROUP,
                   help="tokens (keys) or channels (values) per scale and zero point of a quantized cache")
    p.add_argument("--kv-residual", type=NATURAL, default=DEFAULT_RESIDUAL,
                   help="most recent tokens a quantized cache keeps in full precision")


def kv_quantization(args: argparse.Namespace, bits: int | None = None) -> KVQuantization | None:
    """The quantization the options ask for (``bits`` overrides ``--kv-bits``); None for unquantized."""
    bits = args.kv_bits if bits is None else bits
    if bits is None or bits in (32, 16):
        return None
    return KVQuantization(bits, args.kv_group, args.kv_residual)


def add_position_flags(p: argparse.ArgumentParser, trained: bool = False) -> None:
    """How the global attention sees positions (ModelConfig's position fields): a training-free RoPE
    extension and a query temperature, which an evaluation can put on any trained model; with
    ``trained``, also NoPE (``--global-position``), which a model must be trained with."""
    if trained:
        p.add_argument("--global-position", choices=GLOBAL_POSITIONS,
                       help="the global attention's positions: RoPE, or none (NoPE; a YOCO self-decoder keeps RoPE)")
    p.add_argument("--rope-extension", choices=ROPE_EXTENSIONS,
                   help="training-free RoPE extension of the global attention (position interpolation, "
                        "NTK-aware, YaRN); needs --rope-factor")
    p.add_argument("--rope-factor", type=POSITIVE, help="the extension's factor (> 1): new length / training length")
    p.add_argument("--rope-original-len", type=POSITIVE_INT, help="YaRN: the length the model was trained at")
    p.add_argument("--attn-temperature", choices=ATTN_TEMPERATURES,
                   help="length-dependent temperature of the global queries: llama4 (1 + scale * log(floor((p+1) / "
                        "floor) + 1)) or log (max(1, log(p+1) / log(train len)))")
    p.add_argument("--attn-scale", type=POSITIVE, help="llama4 temperature: its scale (default 0.1)")
    p.add_argument("--attn-floor-scale", type=POSITIVE_INT, help="llama4 temperature: its floor (default 8192)")
    p.add_argument("--attn-train-len", type=POSITIVE_INT, help="log temperature: the training length")


def position_changes(args: argparse.Namespace) -> dict:
    """The position fields the ``add_position_flags`` options set (the ones given)."""
    return {name: getattr(args, name) for name in POSITION_FIELDS if getattr(args, name, None) is not None}


def add_dtype(p: argparse.ArgumentParser, default: str | None = "fp32", help: str = "weights and activations") -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=default, help=help)


def add_seed(p: argparse.ArgumentParser, what: str = "random seed") -> None:
    p.add_argument("--seed", type=NATURAL, default=0, help=what)


def add_archs(p: argparse.ArgumentParser, default: Sequence[str], known: Sequence[str] = NAMES,
              extra: str = "") -> None:
    """``--arch a,b`` (or the flag repeated); without it the command runs `default`."""
    p.add_argument("--arch", type=names(known), action="extend",
                   help=f"architectures, comma-separated or the flag repeated (default: {','.join(default)}{extra})")


# ---------------------------------------------------------------------- training
def add_training_flags(p: argparse.ArgumentParser, defaults, steps_help: str | None = None) -> None:
    """What ``yoco train`` and ``yoco study`` both set: the tokenizer's size and the batches, with the
    defaults of `defaults` (their settings class). With `steps_help`, ``--steps`` has no default: the
    command chooses it (the help says how)."""
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=defaults.vocab_size,
                   help="ids of the BPE tokenizer trained on the corpus")
    if steps_help is None:
        p.add_argument("--steps", type=POSITIVE_INT, default=defaults.steps, help="training steps")
    else:
        p.add_argument("--steps", type=POSITIVE_INT, help=steps_help)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size, help="rows per batch")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=defaults.seq_len, help="tokens per row")


def add_curriculum_flags(p: argparse.ArgumentParser, defaults) -> None:
    """The kinds of retrieval rows and the sequence-length curriculum (``TrainSettings``' fields)."""
    p.add_argument("--retrieval-tasks", type=names(RETRIEVAL_TASKS, "retrieval task"),
                   default=",".join(defaults.retrieval_tasks),
                   help="kinds of retrieval rows, taking turns, comma-separated")
    p.add_argument("--short-seq-len", type=POSITIVE_INT, help="sequence-length curriculum: the first --short-steps "
                                                              "steps train on rows this long (same tokens per step)")
    p.add_argument("--short-steps", type=NATURAL, default=defaults.short_steps, help="steps on --short-seq-len rows")


__all__ = ["UsageError", "add_archs", "add_curriculum_flags", "add_dtype", "add_model_args", "add_position_flags",
           "add_seed", "add_training_flags", "load_from_args", "position_changes"]
