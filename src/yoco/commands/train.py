"""``yoco train``: one architecture trained on text (``python -m yoco.train`` and torchrun take the
same flags)."""

from __future__ import annotations

import argparse

from ..arguments import NATURAL, POSITIVE, POSITIVE_INT, SHARE
from ..config import NAMES, PRESETS
from ..train import TrainSettings, train
from .common import add_curriculum_flags, add_position_flags, add_seed, add_training_flags, position_changes

DEFAULTS = TrainSettings()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an architecture on text (default corpus: the stdlib's own sources)")
    p.add_argument("--arch", choices=NAMES, default=DEFAULTS.arch, help="architecture (one; several: yoco study)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULTS.preset, help="size preset")
    p.add_argument("--data", action="append", help="a text file, folder or JSONL file (repeatable; default: the "
                                                     "Python standard library's .py sources)")
    p.add_argument("--out", required=True, help="run folder: data/, metrics.jsonl, checkpoint-<step>/")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    add_training_flags(p, DEFAULTS)
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=DEFAULTS.grad_accum,
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=DEFAULTS.lr, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--warmup", type=NATURAL, default=DEFAULTS.warmup, help="warmup steps")
    p.add_argument("--grad-clip", type=POSITIVE, default=DEFAULTS.grad_clip, help="gradient norm clip")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=DEFAULTS.eval_every,
                   help="steps between validation losses")
    p.add_argument("--save-every", type=POSITIVE_INT, default=DEFAULTS.save_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=POSITIVE_INT, default=DEFAULTS.log_every,
                   help="steps between metrics.jsonl lines")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=DEFAULTS.parallel,
                   help="under torchrun: replicate (DDP) or shard with FSDP2 (fully_shard per block)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the matmuls")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute its activations in backward: about a third "
                        "more compute, so rows several times longer fit in memory")
    p.add_argument("--retrieval-mix", type=SHARE, default=DEFAULTS.retrieval_mix,
                   help="share of each batch given to synthetic retrieval rows (e.g. 0.25), scored on their "
                        "retrieval targets only")
    add_curriculum_flags(p, DEFAULTS)
    p.add_argument("--window", type=POSITIVE_INT,
                   help="sliding window (yoco-swa's self-decoder; for transformer, every layer; default: the preset's "
                        "for yoco-swa and swa, none otherwise)")
    add_position_flags(p, trained=True)
    p.add_argument("--init-from", help="start from this checkpoint's weights (same model and tokenizer; a new schedule)")
    add_seed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(arch=args.arch, preset=args.preset, corpus=args.data or [], vocab_size=args.vocab_size,
                             steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                             eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
                             seed=args.seed, bf16=args.bf16, parallel=args.parallel,
                             retrieval_mix=args.retrieval_mix, retrieval_tasks=tuple(args.retrieval_tasks),
                             short_seq_len=args.short_seq_len, short_steps=args.short_steps,
                             overrides={**({} if args.window is None else {"window": args.window}),
                                        **position_changes(args)},
                             init_from=args.init_from, activation_checkpointing=args.activation_checkpointing)
    final = train(settings, args.out, resume=args.resume)  # bad settings raise yoco errors: one line, exit 2
    val = "no validation loss" if final.get("val_loss") is None else \
        f"val loss {final['val_loss']:.4f} over {final['val_covers']}"
    print(f"step {final.get('step')}: loss {final.get('loss', float('nan')):.4f}, {val}; checkpoints and "
          f"metrics.jsonl in {args.out}")
    return 0
