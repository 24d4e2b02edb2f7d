"""``yoco init``: a randomly initialised model folder, with a byte-level tokenizer."""

from __future__ import annotations

import argparse

from ..checkpoint import save_model
from ..config import NAMES, PRESETS
from ..data import EOS
from ..models import build_model
from ..tokenizer import byte_level_tokenizer, save_tokenizer
from .common import add_dtype, add_seed


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("init", help="write a randomly initialised model folder")
    p.add_argument("--arch", choices=NAMES, required=True, help="architecture")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size preset")
    p.add_argument("--out", required=True, help="output folder")
    add_dtype(p)
    add_seed(p, "seed for the weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args.arch, preset=args.preset, dtype=args.dtype, seed=args.seed)
    tokenizer = byte_level_tokenizer(model.config.vocab_size)
    save_tokenizer(tokenizer, args.out, model.config.max_seq_len)
    save_model(model, args.out, eos_token_id=tokenizer.token_to_id(EOS), tokenizer=tokenizer)
    print(f"wrote a randomly initialised {args.arch} ({args.preset}, {model.num_parameters() / 1e6:.2f}M params) "
          f"with a byte-level tokenizer to {args.out} (loads with transformers' AutoModelForCausalLM too)")
    return 0
