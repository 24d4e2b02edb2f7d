"""``yoco convert``: uptraining start points (K/V heads pooled, K/V shared across layers) and a
transformers Llama folder as the yoco Transformer."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import POSITIVE_INT
from ..checkpoint import load_model, resolve_checkpoint, save_model
from .common import UsageError, config_eos_token_id


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="uptraining start points: pool K/V heads (MHA -> GQA -> MQA) and/or "
                                              "share K/V across layers (CLA, MLKV)")
    p.add_argument("--checkpoint", help="a saved transformer model folder (a run folder: its latest checkpoint)")
    p.add_argument("--from-llama", help="a local transformers Llama folder: converted to the yoco transformer "
                                        "with identical logits (then optionally pooled/shared)")
    p.add_argument("--kv-heads", type=POSITIVE_INT, help="the new number of K/V heads")
    p.add_argument("--cla-factor", type=POSITIVE_INT, help="CLA: one K/V-producing layer per S layers")
    p.add_argument("--mlkv-layers", type=POSITIVE_INT, help="MLKV: this many K/V-producing layers")
    p.add_argument("--to-llama", action="store_true",
                   help="write a transformers LlamaForCausalLM folder (same logits) instead of a yoco folder: for "
                        "tools that take a Llama (kvpress, lm-eval's hf model); a plain-RoPE GQA transformer only")
    p.add_argument("--out", required=True, help="output model folder (with the source's tokenizer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_kv_heads, from_llama, share_kv_layers

    if (args.checkpoint is None) == (args.from_llama is None):
        raise UsageError("give exactly one source: --checkpoint (a yoco model) or --from-llama (a transformers folder)")
    if (args.from_llama is None and args.kv_heads is None and args.cla_factor is None and args.mlkv_layers is None
            and not args.to_llama):
        raise UsageError("say what to convert to: --kv-heads N, --cla-factor S, --mlkv-layers N and/or --to-llama")
    if args.to_llama and args.from_llama is not None:
        raise UsageError("--to-llama writes a yoco model as a Llama; --from-llama already is one")
    done = []
    if args.from_llama is not None:
        if not (Path(args.from_llama) / "config.json").is_file():
            raise UsageError(f"{args.from_llama!r} is not a transformers model folder (no config.json)")
        source = Path(args.from_llama)
        model = converted = from_llama(args.from_llama)
        done.append(f"Llama {args.from_llama} -> yoco transformer (same logits)")
    else:
        source = resolve_checkpoint(args.checkpoint)
        model = converted = load_model(source)
    if args.kv_heads is not None:
        converted = convert_kv_heads(converted, args.kv_heads)
        done.append(f"{model.config.n_kv_heads} -> {args.kv_heads} K/V heads (mean-pooled)")
    if args.cla_factor is not None or args.mlkv_layers is not None:
        converted = share_kv_layers(converted, cla_factor=args.cla_factor or 1, mlkv_layers=args.mlkv_layers)
        done.append(f"K/V shared across layers {converted.config.kv_sources} (group means)")
    if args.to_llama:
        return write_llama(converted, source, args.out, done)
    tokenizer, eos = copy_tokenizer(source, args.out, converted.config.max_seq_len)
    save_model(converted, args.out, eos_token_id=eos, tokenizer=tokenizer)
    note = "" if tokenizer else "; the source has no tokenizer.json, so the output has none either"
    print(f"wrote {args.out}: {'; '.join(done)}; {converted.num_parameters() / 1e6:.2f}M params{note}")
    return 0


def copy_tokenizer(source: Path, out: str, model_max_length: int):
    """The source folder's tokenizer, written to ``out`` (tokenizer.json and a tokenizer_config.json;
    None if the source has none), and the source's end-of-text id (its config.json's eos_token_id,
    which generation stops at)."""
    from ..data import load_tokenizer
    from ..tokenizer import save_tokenizer

    tokenizer = None
    if (source / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(source, require_eos=False)
        save_tokenizer(tokenizer, out, model_max_length)
    eos = config_eos_token_id(source)
    return tokenizer, eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def write_llama(model, source: Path, out: str, done: list[str]) -> int:
    """``model`` as a transformers Llama folder (safetensors, config.json with the source's eos id, the
    source's tokenizer), written beside ``out`` and renamed into place: never half a folder."""
    import shutil
    import tempfile

    from ..convert import to_llama

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise UsageError(f"{out!r} exists and is not empty: give a new folder for --out")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        tokenizer, eos = copy_tokenizer(source, str(partial), model.config.max_seq_len)
        llama = to_llama(model, eos_token_id=eos)
        llama.save_pretrained(partial)
        if out_path.exists():
            out_path.rmdir()
        partial.rename(out_path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    done.append("written as a transformers LlamaForCausalLM (same logits)")
    note = "" if tokenizer else "; the source has no tokenizer.json, so the output has none either"
    print(f"wrote {out}: {'; '.join(done)}; {model.num_parameters() / 1e6:.2f}M params{note}")
    return 0
