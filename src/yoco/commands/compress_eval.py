"""``yoco compress-eval``: KV-cache compression policies side by side on one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..arguments import DEPTH, POSITIVE_INT, ListOf, budget
from ..checkpoint import load_any_model, resolve_checkpoint
from ..compress import POLICIES
from ..models import CausalLM
from ..report import write_json, write_markdown
from ..ruler import RULER_TASKS, task_names
from ..tasks import TaskError
from ..tokenizer import tokenizer_for
from .common import (UsageError, add_dtype, add_kv_quantization, add_seed, held_out_shards, held_out_split,
                     kv_quantization, text_shards)

DEFAULT_MODEL = "runs/study-retrieval/yoco-swa/checkpoint-2200"
DEFAULT_POLICIES = "streamingllm,snapkv,pyramidkv,h2o,corm,infllm"
DEFAULT_BUDGETS = "0.75,0.5,0.25,0.125"
# compress-eval measures quality, so a missing model is answered with how to train one
NO_MODEL = ("no trained model at {model!r} (no config.json): compress-eval measures quality on a trained model; "
            "train one first, e.g. `yoco study --arch yoco-swa --window 64 --seq-len 1024 --short-seq-len 256 "
            "--short-steps 1500 --steps 2200 --retrieval-mix 0.5 --retrieval-tasks passkey "
            "--out runs/study-retrieval`, or pass --model DIR")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compress-eval", help="KV-cache compression policies side by side: passkey, perplexity, "
                                                    "cache bytes, decode speed")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a yoco checkpoint (a run folder: its latest) or a transformers Llama/Mistral/Qwen2 folder")
    p.add_argument("--policy", default=DEFAULT_POLICIES,
                   help=f"comma-separated policies ({', '.join(POLICIES)}), each "
                        "with options as name:option=value[:...], e.g. infllm:positions=true:topk=4")
    p.add_argument("--budget", type=ListOf(budget, "budgets"), default=DEFAULT_BUDGETS,
                   help="comma-separated budgets: ratios in (0, 1] of the cache kept, token counts, or none (CORM's "
                        "rule alone; InfLLM's paper sizes). InfLLM's budget is its attention window (a ratio: of "
                        "--context). Default: kvpress's compression ratios 0.25, 0.5, 0.75, 0.875 (the share "
                        "removed) as shares kept")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--data", help="token shard folder (default: data/ beside the model folder)")
    text.add_argument("--text", help="your own text: a file, or a folder of text files (a .jsonl among them read by "
                                     "line), tokenized once with the model's tokenizer (cached in .yoco-text-shards/ "
                                     "beside --json, or here)")
    text.add_argument("--jsonl", help='your own text as one JSONL file of {"text": ...} lines, tokenized as --text')
    p.add_argument("--context", type=POSITIVE_INT, default=1024,
                   help="prompt tokens (passkey prompts and the perplexity prefix)")
    p.add_argument("--depths", type=ListOf(DEPTH, "depths"), default="0,0.25,0.5,0.75",
                   help="passkey needle depths, comma-separated")
    p.add_argument("--trials", type=POSITIVE_INT, default=4, help="keys per depth")
    p.add_argument("--tasks", type=tasks_option, default="all",
                   help=f"RULER-style tasks scored at --context, comma-separated ({', '.join(RULER_TASKS)}), all, "
                        "or none")
    p.add_argument("--task-samples", type=POSITIVE_INT, default=4, help="prompts per task")
    p.add_argument("--ppl-rows", type=POSITIVE_INT, default=4,
                   help="held-out rows decoded together for perplexity and speed")
    p.add_argument("--ppl-tokens", type=POSITIVE_INT, default=64, help="tokens scored after each row's prefix")
    add_kv_quantization(p, many=True)
    add_dtype(p)
    add_seed(p)
    p.add_argument("--json", help="write the results as JSON here (and a Markdown table beside it)")
    p.add_argument("--markdown", help="write the Markdown table here (default: the JSON path with .md)")
    p.add_argument("--plot", help="write accuracy and perplexity against cache size as a PNG here")
    p.set_defaults(func=run)


def tasks_option(text: str) -> tuple[str, ...]:
    if text.strip() == "none":
        return ()
    try:
        return task_names(text)
    except TaskError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def split_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..compress import policy_for_context
    from ..compression_eval import compress_eval, markdown_table, plot_results

    policies = split_names(args.policy)
    unknown = [p for p in policies if p.split(":")[0] not in POLICIES]
    if unknown:
        raise UsageError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    args.model = str(resolve_checkpoint(args.model))  # a run folder: its latest checkpoint
    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(NO_MODEL.format(model=args.model))
    model = load_any_model(args.model, args.dtype)
    # a transformers model may pad its vocabulary beyond its tokenizer's; a yoco model is sized by it
    tokenizer = tokenizer_for(args.model, model.config.vocab_size, exact=isinstance(model, CausalLM))
    if args.text is not None or args.jsonl is not None:
        data = text_shards(args.model, args.text, args.jsonl, Path(args.json).parent if args.json else Path.cwd())
    else:
        data = held_out_shards(args.model, args.data)
    val = held_out_split(data, args.context + args.ppl_tokens + args.ppl_rows)
    specs = [("full", None)] + [(p, b) for p in policies for b in args.budget]
    quantizations = [q for q in (kv_quantization(args, bits) for bits in dict.fromkeys(args.kv_bits or ())) if q]
    if quantizations:
        model.new_cache(1, capacity=2, kv_bits=quantizations[0])  # a model it cannot quantize fails first
    for name, amount in specs[1:]:
        policy_for_context(name, amount, args.context)  # a bad combination (a budget-less SnapKV, ...) fails first
    composable = [n for n, b in specs if n == "full" or not policy_for_context(n, b, args.context).keeps_budget_while_decoding]
    bar = tqdm(total=len(specs) + len(quantizations) * len(composable), desc="compress-eval", unit="run", dynamic_ncols=True, file=sys.stderr)

    def progress(row):
        bar.set_postfix_str(f"{row['policy']} {row['budget']} {row['kv_bits']}-bit")
        bar.update()

    try:
        results = compress_eval(model, tokenizer, val.tokens, specs, context=args.context,
                                depths=args.depths, trials=args.trials,
                                ppl_rows=args.ppl_rows, ppl_tokens=args.ppl_tokens, seed=args.seed,
                                progress=progress, kv_bits=quantizations, tasks=args.tasks,
                                task_samples=args.task_samples)
    finally:
        bar.close()
    table = markdown_table(results)
    print(table, end="")
    report = {"model": str(args.model), "arch": model.config.arch, "context": args.context,
              "ppl_tokens": args.ppl_tokens, "ppl_rows": args.ppl_rows, "trials": args.trials,
              "tasks": list(args.tasks), "task_samples": args.task_samples, "results": results}
    if args.json:
        write_json(report, args.json)
        markdown = Path(args.markdown) if args.markdown else Path(args.json).with_suffix(".md")
        write_markdown(table, markdown)
        print(f"wrote {args.json} and {markdown}")
    if args.plot:
        plot_results(results, Path(args.plot), f"KV compression on {model.config.arch} ({Path(args.model).name}), "
                                               f"{args.context}-token prompts")
        print(f"wrote {args.plot}")
    return 0
