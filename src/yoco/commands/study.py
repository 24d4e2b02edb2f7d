"""``yoco study``: architectures trained at matched parameters, compared on quality against cache."""

from __future__ import annotations

import argparse

from ..arguments import DEPTH, POSITIVE_INT, SHARE, ListOf, TokenCount, names
from ..config import PRESETS
from ..long_study import LONG_OPTIONS, QUICK_OPTION, LongStudySettings
from ..study import STUDY_ARCHS, StudySettings
from .common import UsageError, add_archs, add_curriculum_flags, add_seed, add_training_flags

DEFAULTS = StudySettings()
LONG_DEFAULTS = LongStudySettings()
# The training flags both studies take, with a default each: given, they apply to either; not given, each
# study keeps its own (the long study trains as the retrieval study does: window 64, 1024-token rows...).
SHARED_FLAGS = ("preset", "vocab_size", "batch_size", "seq_len", "retrieval_mix", "retrieval_tasks", "short_seq_len",
                "short_steps", "window")
# what only the architecture study takes
STUDY_ONLY_FLAGS = ("arch", "val_batches")
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
    p.add_argument("--window", type=POSITIVE_INT, help="sliding window of the windowed architectures (yoco-swa, swa)")
    p.add_argument("--data", action="append", help="corpus paths (default: the stdlib's sources)")
    p.add_argument("--trials", type=POSITIVE_INT, help=f"passkey keys per cell (default: {DEFAULTS.trials}; "
                                                       f"{QUICK_TRIALS} with --quick)")
    p.add_argument("--val-batches", type=POSITIVE_INT, help="batches for the final validation loss (default: the "
                                                            "whole held-out split)")
    p.add_argument("--long", action="store_true",
                   help="the long-context study: YOCO-SWA trained at 1024 tokens with each position option of its "
                        "global attention (and the controls), passkey from 1K to 1M tokens; with --quick the best "
                        f"option ({QUICK_OPTION}) and rope at 64K and 1M only")
    p.add_argument("--options", type=names(LONG_OPTIONS, "position option"), action="extend",
                   help=f"--long: the position options to run (default: {','.join(LONG_OPTIONS)})")
    p.add_argument("--contexts", type=ListOf(TokenCount(1), "context lengths"),
                   help="--long: passkey contexts (default: 1K,4K,16K,64K,256K,1M; --quick: 64K,1M)")
    p.add_argument("--depths", type=ListOf(DEPTH, "depths"), help="--long: needle depths (default: 0,0.25,0.5,0.75,1; "
                                                                  "--quick: 0,0.5,1)")
    add_seed(p)
    p.add_argument("--out", required=True, help="study folder: data/, one run folder per architecture, results")
    for action in p._actions:
        if action.dest in SHARED_FLAGS:
            shown = [",".join(d) if isinstance(d, tuple) else d for d in
                     (getattr(DEFAULTS, action.dest), getattr(LONG_DEFAULTS, action.dest))]
            unset = "the preset's" if action.dest == "window" else "none"
            action.help += f" (default: {unset if shown[0] is None else shown[0]}; with --long: {shown[1]})"
            action.default = None
    p.set_defaults(func=run)


def shared_settings(args: argparse.Namespace, defaults) -> dict:
    """The shared flags' values: those given, else the study's own defaults."""
    values = {name: getattr(args, name) for name in SHARED_FLAGS}
    values = {name: getattr(defaults, name) if value is None else value for name, value in values.items()}
    values["retrieval_tasks"] = tuple(values["retrieval_tasks"])
    return values


def run_long(args: argparse.Namespace) -> int:
    from ..long_study import markdown, run_long_study

    for flag in STUDY_ONLY_FLAGS:
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is an option of the architecture study, not of --long "
                             f"(which trains its position options: --options)")
    changes = shared_settings(args, LONG_DEFAULTS)
    changes.update({name: value for name, value in (
        ("options", tuple(args.options) if args.options else None), ("contexts", args.contexts and tuple(args.contexts)),
        ("depths", args.depths and tuple(args.depths)), ("trials", args.trials), ("steps", args.steps),
        ("corpus", args.data), ("seed", args.seed)) if value is not None})
    settings = (LongStudySettings.quick if args.quick else LongStudySettings)(**changes)
    results = run_long_study(settings, args.out)
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md and a passkey heatmap per option")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.long:
        return run_long(args)
    for flag in ("options", "contexts", "depths"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is an option of the long study: add --long")
    from ..study import markdown, run_study

    settings = StudySettings(archs=tuple(args.arch) if args.arch else STUDY_ARCHS,
                             steps=args.steps or (QUICK_STEPS if args.quick else DEFAULTS.steps),
                             corpus=args.data or [], trials=args.trials or (QUICK_TRIALS if args.quick else DEFAULTS.trials),
                             seed=args.seed, val_batches=args.val_batches, **shared_settings(args, DEFAULTS))
    results = run_study(settings, args.out)
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md, pareto.png, loss_curves.png, retrieval.png")
    return 0
