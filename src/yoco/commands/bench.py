"""``yoco bench``: memory, prefill time and decode throughput against context length."""

from __future__ import annotations

import argparse

from ..arguments import NATURAL, POSITIVE, POSITIVE_INT, ListOf, Number, TokenCount, token_count_text
from ..bench import (BENCH_ARCHS, DEFAULT_CONTEXTS, GIB, QUICK_CONTEXTS, TABLE_HEADERS, BenchSettings, busy_warning,
                     kv_bits_rows, machine_line, ratio_rows, run_bench, table_rows, write_plot)
from ..bench_train import (TRAIN_ARCHS, TRAIN_SEQ_LENS, TRAIN_TABLE_HEADERS, TrainBenchSettings, run_train_bench,
                           train_ratio_rows, train_table_rows)
from ..config import NAMES, PRESETS
from ..report import markdown_table, print_table, write_json, write_markdown
from .common import UsageError, add_archs, add_dtype, add_kv_quantization, add_seed

# --quick: fewer contexts (QUICK_CONTEXTS) and fewer timed steps
QUICK_NEW_TOKENS = 12
QUICK_BUDGET_STEPS = 2


def contexts_text(contexts) -> str:
    return f"{token_count_text(contexts[0])}..{token_count_text(contexts[-1])}"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="memory, prefill time and decode throughput against context length")
    add_archs(p, BENCH_ARCHS, ("hf-llama",) + NAMES, "; any of `yoco kv-table`'s names or hf-llama")
    p.add_argument("--context", type=ListOf(TokenCount(2), "context lengths"), action="extend",
                   help=f"context lengths, comma-separated, e.g. 1K,4K,32K "
                        f"(default: {contexts_text(DEFAULT_CONTEXTS)}; {contexts_text(QUICK_CONTEXTS)} with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{contexts_text(QUICK_CONTEXTS)}, fewer tokens: a few minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), default=BenchSettings.preset, help="size preset")
    add_dtype(p, default=None, help="weights and activations (default fp32); with --train, bf16 autocasts the "
                                     f"matmuls (default {TrainBenchSettings.dtype})")
    p.add_argument("--new-tokens", type=Number(int, "an integer >= 2 (the first decoded token is a warm-up)", low=2),
                   help=f"decode steps at batch 1 (default: {BenchSettings.new_tokens}; {QUICK_NEW_TOKENS} "
                        "with --quick)")
    p.add_argument("--budget-gib", type=POSITIVE, default=BenchSettings.budget_bytes / GIB,
                   help="memory budget for the batched throughput (GiB)")
    p.add_argument("--budget-steps", type=POSITIVE_INT,
                   help=f"decode steps timed at the budget batch (default: {BenchSettings.budget_steps}; "
                        f"{QUICK_BUDGET_STEPS} with --quick)")
    p.add_argument("--max-budget-batch", type=POSITIVE_INT, default=BenchSettings.max_budget_batch,
                   help="cap on the budget batch (bounds run time)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=BenchSettings.prefill_chunk,
                   help="chunk size of this library's prefill")
    p.add_argument("--max-quadratic-context", type=POSITIVE_INT, default=BenchSettings.max_quadratic_context,
                   help="Transformer contexts above this are extrapolated, not run")
    p.add_argument("--threads", type=NATURAL, default=BenchSettings.threads, help="torch threads (0: torch's choice)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=BenchSettings.repeats,
                   help="prefills timed per row; the fastest is reported (another job on the machine only ever "
                        "slows one), all are in the JSON (prefill_s_each)")
    p.add_argument("--compile", action="store_true",
                   help="decode with the step captured by torch.compile (the warm-up step compiles)")
    train = p.add_argument_group("training throughput (--train)")
    train.add_argument("--train", action="store_true",
                       help=f"measure training tokens/s instead: {', '.join(TRAIN_ARCHS)} by default (hf-llama: "
                            f"transformers' Trainer on a LlamaForCausalLM of the same dimensions), on rows of the "
                            f"--context lengths (default {contexts_text(TRAIN_SEQ_LENS)}); --dtype bf16 autocasts")
    train.add_argument("--batch-size", type=POSITIVE_INT, default=TrainBenchSettings.batch_size,
                       help="rows per training step")
    train.add_argument("--train-steps", type=POSITIVE_INT, default=TrainBenchSettings.steps,
                       help="timed training steps per architecture and length")
    train.add_argument("--warmup-steps", type=POSITIVE_INT, default=TrainBenchSettings.warmup,
                       help="untimed training steps first")
    train.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each block's activations in backward (both sides)")
    add_seed(p)
    add_kv_quantization(p, many=True)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG of memory, prefill time and throughput against context here")
    p.add_argument("--markdown", help="write the table and the ratios as Markdown here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.train:
        return run_train(args)
    archs = tuple(args.arch) if args.arch else BENCH_ARCHS
    contexts = tuple(args.context) if args.context else QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS
    new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else BenchSettings.new_tokens)
    budget_steps = args.budget_steps or (QUICK_BUDGET_STEPS if args.quick else BenchSettings.budget_steps)
    settings = BenchSettings(archs=archs, contexts=contexts, preset=args.preset, dtype=args.dtype or BenchSettings.dtype,
                             new_tokens=new_tokens, budget_bytes=int(args.budget_gib * GIB), budget_steps=budget_steps,
                             max_budget_batch=args.max_budget_batch, prefill_chunk=args.prefill_chunk,
                             max_quadratic_context=args.max_quadratic_context, threads=args.threads, seed=args.seed,
                             repeats=args.repeats, compile=args.compile, kv_bits=tuple(args.kv_bits or ()),
                             kv_group=args.kv_group, kv_residual=args.kv_residual)
    report = run_bench(settings, log=lambda text: print(text, flush=True))
    extrapolated = ("* extrapolated from the longest measured context (not run): prefill by useful FLOPs, decode by "
                    "bytes read per token, cache by formula")
    return show_and_write(args, report, TABLE_HEADERS, table_rows(report), ratio_rows(report) + kv_bits_rows(report),
                          under_table=extrapolated if any(r["extrapolated"] for r in report["results"]) else None,
                          plot=write_plot)


def show_and_write(args: argparse.Namespace, report: dict, headers, rows, notes: list[str],
                   under_table: str | None = None, plot=None) -> int:
    """What both benchmarks print and write: the table (a note under it), the comparison lines, the
    machine and, if its probes disagreed, the busy warning; the JSON, the plot (``plot(report, path)``)
    and the Markdown (the table, the comparison lines and the warning), where asked."""
    print()
    print_table(headers, rows)
    if under_table:
        print(under_table)
    for line in notes:
        print(line)
    print(f"machine: {machine_line(report['machine'])}; whole run {report['wall_s']:.0f} s")
    warning = busy_warning(report["machine"])
    if warning:
        print(warning)  # on stdout, with the figures it casts doubt on
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if plot is not None and args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        lines = "\n".join(f"- {line}" for line in notes + ([warning] if warning else []))
        write_markdown(markdown_table(headers, rows) + "\n\n" + lines + "\n", args.markdown)
        print(f"wrote {args.markdown}")
    return 0


# flags of the inference benchmark that mean nothing to --train (given with it: refused, not ignored)
INFERENCE_ONLY = {"kv_bits": "--kv-bits", "compile": "--compile", "new_tokens": "--new-tokens",
                  "budget_steps": "--budget-steps", "quick": "--quick", "plot": "--plot"}


def run_train(args: argparse.Namespace) -> int:
    given = [flag for name, flag in INFERENCE_ONLY.items() if getattr(args, name)]
    if given:
        raise UsageError(f"{', '.join(given)} measure inference, not training: drop "
                         f"{'them' if len(given) > 1 else 'it'} with --train")
    settings = TrainBenchSettings(archs=tuple(args.arch) if args.arch else TRAIN_ARCHS,
                                  seq_lens=tuple(args.context) if args.context else TRAIN_SEQ_LENS, preset=args.preset,
                                  dtype=args.dtype or TrainBenchSettings.dtype, batch_size=args.batch_size,
                                  steps=args.train_steps,
                                  warmup=args.warmup_steps, activation_checkpointing=args.activation_checkpointing,
                                  threads=args.threads, seed=args.seed)
    report = run_train_bench(settings, log=lambda text: print(text, flush=True))
    return show_and_write(args, report, TRAIN_TABLE_HEADERS, train_table_rows(report), train_ratio_rows(report))
