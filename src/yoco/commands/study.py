"""``yoco study``: architectures trained at matched parameters, compared on quality against cache."""

from __future__ import annotations

import argparse

from ..arguments import POSITIVE_INT, SHARE
from ..config import PRESETS
from ..study import STUDY_ARCHS, StudySettings
from .common import add_archs, add_curriculum_flags, add_seed, add_training_flags

DEFAULTS = StudySettings()
# --quick: fewer steps per architecture and fewer passkey keys per cell
QUICK_STEPS = 400
QUICK_TRIALS = 2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="train architectures at matched parameters and compare quality vs cache")
    add_archs(p, STUDY_ARCHS, extra="; swa is the window-only control")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} steps per architecture (about 14 minutes on 2 cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULTS.preset, help="size preset")
    add_training_flags(p, DEFAULTS, steps_help=f"training steps per architecture (default: {DEFAULTS.steps}; "
                                               f"{QUICK_STEPS} with --quick)")
    p.add_argument("--retrieval-mix", type=SHARE, default=DEFAULTS.retrieval_mix,
                   help="share of each batch given to synthetic retrieval rows")
    add_curriculum_flags(p, DEFAULTS)
    p.add_argument("--window", type=POSITIVE_INT, help="sliding window of the windowed architectures (yoco-swa, swa); "
                                                        "default: the preset's")
    p.add_argument("--data", action="append", help="corpus paths (default: the stdlib's sources)")
    p.add_argument("--trials", type=POSITIVE_INT, help=f"passkey keys per cell (default: {DEFAULTS.trials}; "
                                                       f"{QUICK_TRIALS} with --quick)")
    p.add_argument("--val-batches", type=POSITIVE_INT, help="batches for the final validation loss (default: the "
                                                            "whole held-out split)")
    add_seed(p)
    p.add_argument("--out", required=True, help="study folder: data/, one run folder per architecture, results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import markdown, run_study

    settings = StudySettings(archs=tuple(args.arch) if args.arch else STUDY_ARCHS, preset=args.preset,
                             steps=args.steps or (QUICK_STEPS if args.quick else DEFAULTS.steps),
                             batch_size=args.batch_size, seq_len=args.seq_len, retrieval_mix=args.retrieval_mix,
                             corpus=args.data or [], vocab_size=args.vocab_size,
                             trials=args.trials or (QUICK_TRIALS if args.quick else DEFAULTS.trials), seed=args.seed,
                             window=args.window, retrieval_tasks=tuple(args.retrieval_tasks),
                             short_seq_len=args.short_seq_len, short_steps=args.short_steps,
                             val_batches=args.val_batches)
    results = run_study(settings, args.out)
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md, pareto.png, loss_curves.png, retrieval.png")
    return 0
