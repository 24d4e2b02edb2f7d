"""The ``yoco`` command line: ``yoco demo``, ``yoco generate``, ``yoco init``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Sequence

import torch

from .arguments import (DEPTH, NATURAL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, SHARE, ListOf, Number,
                        Parser, TokenCount, budget, names, token_ids)
from .bench import BenchError
from .cache import CacheError
from .checkpoint import CheckpointError, load_model, resolve_checkpoint, save_model
from .compress.policies import BudgetError
from .config import NAMES, PRESETS, ConfigError
from .data import SPECIAL_TOKENS, DataError
from .engine import generate, stream
from .models import CausalLM, InputError, build_model, cache_growth_per_token, resolve_dtype
from .report import format_bytes, json_text, print_table, times
from .tokenizer import tokenizer_for


class UsageError(ValueError):
    pass


# ---------------------------------------------------------------------- model selection
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=NAMES, default="yoco-swa", help="architecture of a randomly initialised model")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size preset of that model")
    p.add_argument("--checkpoint", help="a saved model folder (config.json + model.safetensors), or a training run "
                                        "folder for its latest checkpoint; overrides --arch/--preset")
    add_dtype(p)
    add_seed(p, "seed for random initialisation and sampling")


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations")


def add_seed(p: argparse.ArgumentParser, what: str = "random seed") -> None:
    p.add_argument("--seed", type=NATURAL, default=0, help=what)


def load_from_args(args: argparse.Namespace) -> CausalLM:
    if args.checkpoint:
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a run folder: its latest checkpoint
        return load_model(args.checkpoint, dtype=args.dtype)
    return build_model(args.arch, preset=args.preset, dtype=args.dtype, seed=args.seed)


# ---------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    if args.prompt_ids is not None:
        prompt, tokenizer = args.prompt_ids, None
    else:
        tokenizer = tokenizer_for(args.checkpoint, model.config.vocab_size)
        prompt = tokenizer.encode(args.prompt)
        if getattr(tokenizer, "eos_id", None) is not None:
            args.stop = args.stop + [tokenizer.eos_id]  # a trained model ends a document with <|endoftext|>
    if not prompt:
        raise UsageError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_tokens=args.stop, prefill_chunk=args.prefill_chunk)

    def show(tokens: list[int]) -> str:
        return tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))

    if args.stream:
        generation = stream(model, [prompt], args.max_new_tokens, **options)
        for step in generation:
            if step[0] is not None:
                print(show([step[0]]) if tokenizer else step[0], end="" if tokenizer else " ", flush=True)
        print()
        result = generation.result()
    else:
        result = generate(model, [prompt], args.max_new_tokens, **options)
        print(show(result.tokens[0]))
    name = model.config.arch if args.checkpoint else args.arch
    print(f"[{name}, {model.num_parameters() / 1e6:.2f}M params] prompt {len(prompt)} tokens, "
          f"{len(result.tokens[0])} new ({result.finish_reasons[0]}); prefill {result.prefill_s:.3f} s, "
          f"decode {result.decode_tok_s:.1f} tok/s; cache {format_bytes(result.cache_bytes)}", file=sys.stderr)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .data import EOS
    from .tokenizer import byte_level_tokenizer, save_tokenizer

    model = build_model(args.arch, preset=args.preset, dtype=args.dtype, seed=args.seed)
    tokenizer = byte_level_tokenizer(model.config.vocab_size)
    save_tokenizer(tokenizer, args.out, model.config.max_seq_len)
    save_model(model, args.out, eos_token_id=tokenizer.token_to_id(EOS), tokenizer=tokenizer)
    print(f"wrote a randomly initialised {args.arch} ({args.preset}, {model.num_parameters() / 1e6:.2f}M params) "
          f"with a byte-level tokenizer to {args.out} (loads with transformers' AutoModelForCausalLM too)")
    return 0


DEMO_ARCHS = ("transformer", "yoco-swa", "yoco-gret")


def cmd_demo(args: argparse.Namespace) -> int:
    """Build each architecture at one size, generate from the same random prompt, compare caches."""
    from tqdm import tqdm

    dtype = resolve_dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    rows, base_cache = [], None
    print(f"yoco demo: preset {args.preset}, {args.dtype}, prompt of {args.context} random tokens, "
          f"{args.new_tokens} new tokens (greedy), {torch.get_num_threads()} threads")
    for arch in tqdm(args.arch or DEMO_ARCHS, desc="architectures", file=sys.stderr):
        model = build_model(arch, preset=args.preset, dtype=dtype, seed=args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=generator).tolist()
        result = generate(model, [prompt], args.new_tokens, prefill_chunk=args.prefill_chunk)
        per_token = cache_growth_per_token(model.config, dtype)
        base_cache = base_cache or result.cache_bytes
        rows.append([arch, f"{model.num_parameters() / 1e6:.1f}M", format_bytes(result.cache_bytes),
                     times(base_cache / result.cache_bytes, "smaller", "larger"), format_bytes(per_token),
                     f"{result.prefill_s:.2f}", f"{result.decode_tok_s:.1f}", " ".join(map(str, result.tokens[0][:6]))])
    print()
    first = (args.arch or DEMO_ARCHS)[0]
    print_table(["arch", "params", "cache", f"cache vs {first}", "growth/token", "prefill s", "decode tok/s",
                 "first tokens"], rows)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import (BENCH_ARCHS, DEFAULT_CONTEXTS, GIB, QUICK_CONTEXTS, TABLE_HEADERS, BenchSettings,
                        busy_warning, machine_line, markdown_table, ratio_rows, run_bench, table_rows,
                        write_json, write_plot)

    archs = tuple(args.arch) if args.arch else BENCH_ARCHS
    contexts = tuple(args.context) if args.context else QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS
    new_tokens = args.new_tokens or (12 if args.quick else 32)
    budget_steps = args.budget_steps or (2 if args.quick else 3)
    settings = BenchSettings(archs=archs, contexts=contexts, preset=args.preset, dtype=args.dtype,
                             new_tokens=new_tokens, budget_bytes=int(args.budget_gib * GIB), budget_steps=budget_steps,
                             max_budget_batch=args.max_budget_batch, prefill_chunk=args.prefill_chunk,
                             max_quadratic_context=args.max_quadratic_context, threads=args.threads, seed=args.seed)
    report = run_bench(settings, log=lambda text: print(text, flush=True))
    print()
    print_table(TABLE_HEADERS, table_rows(report))
    if any(r["extrapolated"] for r in report["results"]):
        print("* extrapolated from the longest measured context (not run): prefill by useful FLOPs, decode by "
              "bytes read per token, cache by formula")
    for line in ratio_rows(report):
        print(line)
    print(f"machine: {machine_line(report['machine'])}; whole run {report['wall_s']:.0f} s")
    warning = busy_warning(report["machine"])
    if warning:
        print(warning)  # on stdout, with the figures it casts doubt on
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        from .checkpoint import atomic_write

        notes = ratio_rows(report) + ([warning] if warning else [])
        atomic_write(Path(args.markdown), lambda tmp: Path(tmp).write_text(
            markdown_table(report) + "\n\n" + "\n".join(f"- {line}" for line in notes) + "\n"))
        print(f"wrote {args.markdown}")
    return 0


def cmd_kv_table(args: argparse.Namespace) -> int:
    from .bench import kv_table

    context = args.context
    presets = sorted(PRESETS) if args.preset == "all" else [args.preset]
    rows = [row for preset in presets for row in kv_table(preset, context, args.dtype, names=args.arch)]
    print(f"KV cache per sequence, {args.dtype}; measured = growth of a real cache from {context} positions "
          f"to twice that; constant = the part that does not grow")
    print_table(["arch", "preset", "params", "bytes/token (formula)", "bytes/token (measured)", "constant",
                 f"cache @ {context}", "vs transformer"],
                [[r["arch"], r["preset"], f"{r['params'] / 1e6:.2f}M", f"{r['formula_bytes_per_token']:,.0f}",
                  f"{r['measured_bytes_per_token']:,.0f}", format_bytes(r["constant_bytes"]),
                  format_bytes(r["cache_bytes_at_context"]),
                  "-" if r["vs_transformer"] is None else times(r["vs_transformer"], "smaller", "larger")]
                 for r in rows])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_kv_heads, from_llama, share_kv_layers

    if (args.checkpoint is None) == (args.from_llama is None):
        raise UsageError("give exactly one source: --checkpoint (a yoco model) or --from-llama (a transformers folder)")
    if args.from_llama is None and args.kv_heads is None and args.cla_factor is None and args.mlkv_layers is None:
        raise UsageError("say what to convert to: --kv-heads N, --cla-factor S and/or --mlkv-layers N")
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
    tokenizer, eos = copy_tokenizer(source, args.out, converted.config.max_seq_len)
    save_model(converted, args.out, eos_token_id=eos, tokenizer=tokenizer)
    note = "" if tokenizer else "; the source has no tokenizer.json, so the output has none either"
    print(f"wrote {args.out}: {'; '.join(done)}; {converted.num_parameters() / 1e6:.2f}M params{note}")
    return 0


def copy_tokenizer(source: Path, out: str, model_max_length: int):
    """The source folder's tokenizer, written to ``out`` (tokenizer.json and a tokenizer_config.json;
    None if the source has none), and the source's end-of-text id (its config.json's eos_token_id,
    which generation stops at)."""
    import json

    from .data import load_tokenizer
    from .tokenizer import save_tokenizer

    tokenizer = None
    if (source / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(source, require_eos=False)
        save_tokenizer(tokenizer, out, model_max_length)
    try:
        eos = json.loads((source / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    return tokenizer, eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def split_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_curriculum_flags(p: argparse.ArgumentParser) -> None:
    from .train import RETRIEVAL_TASKS

    p.add_argument("--retrieval-tasks", type=names(RETRIEVAL_TASKS, "retrieval task"), default=",".join(RETRIEVAL_TASKS),
                   help="kinds of retrieval rows, taking turns, comma-separated")
    p.add_argument("--short-seq-len", type=POSITIVE_INT, help="sequence-length curriculum: the first --short-steps "
                                                              "steps train on rows this long (same tokens per step)")
    p.add_argument("--short-steps", type=NATURAL, default=0, help="steps on --short-seq-len rows")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainSettings, train

    settings = TrainSettings(arch=args.arch, preset=args.preset, corpus=args.data or [], vocab_size=args.vocab_size,
                             steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                             eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
                             seed=args.seed, bf16=args.bf16, parallel=args.parallel,
                             retrieval_mix=args.retrieval_mix, retrieval_tasks=tuple(args.retrieval_tasks),
                             short_seq_len=args.short_seq_len, short_steps=args.short_steps,
                             overrides={} if args.window is None else {"window": args.window},
                             init_from=args.init_from)
    try:
        final = train(settings, args.out, resume=args.resume)
    except ValueError as e:  # bad settings (DataError and ConfigError are ValueErrors too)
        raise UsageError(str(e)) from None
    val = "no validation loss" if final.get("val_loss") is None else \
        f"val loss {final['val_loss']:.4f} over {final['val_covers']}"
    print(f"step {final.get('step')}: loss {final.get('loss', float('nan')):.4f}, {val}; checkpoints and "
          f"metrics.jsonl in {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write
    from .data import TokenShards
    from .evaluate import covered, mqar_accuracy, mqar_batch, passkey_grid, plot_passkey, validation_loss

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a run folder: its latest checkpoint
    model = load_model(args.checkpoint, dtype=args.dtype)
    tokenizer = tokenizer_for(args.checkpoint, model.config.vocab_size)
    data = Path(args.data) if args.data else Path(args.checkpoint).resolve().parent / "data"
    if not (data / "meta.json").is_file():
        raise UsageError(f"no held-out token shards at {str(data)!r}: pass --data with the run's data folder")
    val = TokenShards(data, "val")
    if len(val) < args.seq_len + 1:
        print(f"note: the validation split holds {len(val)} tokens, fewer than one row of {args.seq_len} + 1; "
              "scoring the training split instead")
        val = TokenShards(data, "train")
    report = {"checkpoint": str(args.checkpoint), "arch": model.config.arch}
    report.update(validation_loss(model, val, args.batch_size, args.seq_len, args.batches))
    if report["val_loss"] is None:  # even the training split (scored instead) holds no row
        raise UsageError(f"{covered(report)} of --seq-len + 1 = {args.seq_len + 1} at {str(data)!r}: pass a shorter "
                         "--seq-len")
    print(f"validation loss {report['val_loss']:.4f}, perplexity {report['perplexity']:.2f} over "
          f"{covered(report)} ({report['batches']} batches of {args.batch_size} x {args.seq_len})")
    haystack = val.tokens
    try:
        cells = passkey_grid(model, tokenizer, haystack, args.contexts, args.depths, args.trials, args.seed)
    except ValueError as e:  # a context too short for the needle, a haystack too small, a bad depth
        raise UsageError(f"passkey: {e}") from None
    report["passkey"] = cells
    print_table(["context", "depth", "accuracy"], [[c["context"], f"{c['depth']:.0%}", f"{c['accuracy']:.0%}"]
                                                   for c in cells])
    # MQAR draws ids past the trained tokenizer's special tokens (<|endoftext|>, <|pad|>), as the study does
    ids, mask = mqar_batch(args.mqar_samples, args.mqar_pairs, args.mqar_queries,
                           range(len(SPECIAL_TOKENS), min(model.config.vocab_size, 4096)), seed=args.seed)
    report["mqar_accuracy"] = mqar_accuracy(model.eval(), ids, mask)
    print(f"MQAR ({args.mqar_pairs} pairs, {args.mqar_queries} queries): accuracy {report['mqar_accuracy']:.1%}")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json_text(report) + "\n"))
        print(f"wrote {args.json}")
    if args.plot:
        window = "" if model.config.window is None else f", window {model.config.window}"
        checkpoint = Path(args.checkpoint).resolve()
        plot_passkey(cells, Path(args.plot), f"passkey retrieval: {model.config.arch}{window}\n"
                                             f"{checkpoint.parent.name}/{checkpoint.name}")
        print(f"wrote {args.plot}")
    return 0


DEFAULT_COMPRESS_MODEL = "runs/study-retrieval/yoco-swa/checkpoint-2200"


def load_any_model(directory: str, dtype: str):
    """A yoco folder as a yoco model; a transformers Llama/Mistral/Qwen2 folder through the adapter."""
    import json

    path = Path(directory)
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"no trained model at {directory!r} (no config.json): compress-eval measures quality "
                         "on a trained model; train one first, e.g. `yoco study --arch yoco-swa --window 64 "
                         "--seq-len 1024 --short-seq-len 256 --short-steps 1500 --steps 2200 --retrieval-mix 0.5 "
                         "--retrieval-tasks passkey --out runs/study-retrieval`, or pass --model DIR")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(config)!r} is not valid JSON ({e})") from None
    if model_type in (None, "yoco"):
        return load_model(path, dtype=dtype)
    from transformers import AutoModelForCausalLM

    from .hf_runner import TransformersLM

    return TransformersLM(AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)))


def cmd_compress_eval(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write
    from .compress import POLICIES
    from .compression_eval import compress_eval, markdown_table, plot_results
    from .data import TokenShards

    policies = split_names(args.policy)
    unknown = [p for p in policies if p.split(":")[0] not in POLICIES]
    if unknown:
        raise UsageError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    budgets = args.budget
    args.model = str(resolve_checkpoint(args.model))  # a run folder: its latest checkpoint
    model = load_any_model(args.model, args.dtype)
    # a transformers model may pad its vocabulary beyond its tokenizer's; a yoco model is sized by it
    tokenizer = tokenizer_for(args.model, model.config.vocab_size, exact=isinstance(model, CausalLM))
    folder = Path(args.model).resolve()
    # a training run keeps data/ beside its checkpoints; a study keeps one for all its runs, a level up
    found = [d for d in (folder.parent / "data", folder.parent.parent / "data") if (d / "meta.json").is_file()]
    data = Path(args.data) if args.data else (found[0] if found else folder.parent / "data")
    if not (data / "meta.json").is_file():
        raise UsageError(f"no held-out token shards at {str(data)!r}: pass --data with a token shard folder "
                         "written with this model's tokenizer")
    val = TokenShards(data, "val")
    if len(val) < args.context + args.ppl_tokens + args.ppl_rows:
        val = TokenShards(data, "train")
    specs = [("full", None)] + [(p, b) for p in policies for b in budgets]
    from .compress import policy_for_context

    for name, amount in specs[1:]:
        policy_for_context(name, amount, args.context)  # a bad combination (a budget-less SnapKV, ...) fails first
    from tqdm import tqdm

    bar = tqdm(total=len(specs), desc="compress-eval", unit="run", dynamic_ncols=True, file=sys.stderr)

    def progress(row):
        bar.set_postfix_str(f"{row['policy']} {row['budget']}")
        bar.update()

    try:
        results = compress_eval(model, tokenizer, val.tokens, specs, context=args.context,
                                depths=args.depths, trials=args.trials,
                                ppl_rows=args.ppl_rows, ppl_tokens=args.ppl_tokens, seed=args.seed,
                                progress=progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    table = markdown_table(results)
    print(table, end="")
    report = {"model": str(args.model), "arch": model.config.arch, "context": args.context,
              "ppl_tokens": args.ppl_tokens, "ppl_rows": args.ppl_rows, "trials": args.trials, "results": results}
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json_text(report) + "\n"))
        markdown = Path(args.markdown) if args.markdown else Path(args.json).with_suffix(".md")
        atomic_write(markdown, lambda tmp: Path(tmp).write_text(table))
        print(f"wrote {args.json} and {markdown}")
    if args.plot:
        plot_results(results, Path(args.plot), f"KV compression on {model.config.arch} ({Path(args.model).name}), "
                                               f"{args.context}-token prompts")
        print(f"wrote {args.plot}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import STUDY_ARCHS, StudySettings, run_study

    archs = tuple(args.arch) if args.arch else STUDY_ARCHS
    steps = args.steps or (400 if args.quick else 2000)
    settings = StudySettings(archs=archs, preset=args.preset, steps=steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, retrieval_mix=args.retrieval_mix, corpus=args.data or [],
                             vocab_size=args.vocab_size, trials=args.trials or (2 if args.quick else 4), seed=args.seed,
                             window=args.window, retrieval_tasks=tuple(args.retrieval_tasks),
                             short_seq_len=args.short_seq_len, short_steps=args.short_steps,
                             val_batches=args.val_batches)
    try:
        results = run_study(settings, args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .study import markdown

    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md, pareto.png, loss_curves.png, retrieval.png")
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from .bench import BENCH_ARCHS
    from .study import STUDY_ARCHS

    parser = Parser(prog="yoco", description="YOCO and KV-cache-efficient language models")
    sub = parser.add_subparsers(dest="command", required=True)

    def archs(p, default: Sequence[str], known: Sequence[str] = NAMES, extra: str = "") -> None:
        p.add_argument("--arch", type=names(known), action="extend",
                       help=f"architectures, comma-separated or the flag repeated (default: {','.join(default)}"
                            f"{extra})")

    p = sub.add_parser("demo", help="build each architecture, generate, and compare cache sizes")
    archs(p, DEMO_ARCHS)
    p.add_argument("--preset", choices=sorted(PRESETS), default="40m", help="size preset")
    p.add_argument("--context", type=POSITIVE_INT, default=4096, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=16, help="tokens generated (greedy)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=1024, help="prompt tokens per prefill call")
    add_dtype(p)
    add_seed(p, "seed for the weights and the random prompt")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="memory, prefill time and decode throughput against context length")
    archs(p, BENCH_ARCHS, ("hf-llama",) + NAMES, "; any of `yoco kv-table`'s names or hf-llama")
    p.add_argument("--context", type=ListOf(TokenCount(2), "context lengths"), action="extend",
                   help="context lengths, comma-separated, e.g. 1K,4K,32K (default: 1K..32K; 1K..8K with --quick)")
    p.add_argument("--quick", action="store_true", help="1K..8K, fewer tokens: a few minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="40m", help="size preset")
    add_dtype(p)
    p.add_argument("--new-tokens", type=Number(int, "an integer >= 2 (the first decoded token is a warm-up)", low=2),
                   help="decode steps at batch 1 (default: 32; 12 with --quick)")
    p.add_argument("--budget-gib", type=POSITIVE, default=4.0, help="memory budget for the batched throughput (GiB)")
    p.add_argument("--budget-steps", type=POSITIVE_INT,
                   help="decode steps timed at the budget batch (default: 3; 2 with --quick)")
    p.add_argument("--max-budget-batch", type=POSITIVE_INT, default=512, help="cap on the budget batch (bounds run time)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=2048, help="chunk size of this library's prefill")
    p.add_argument("--max-quadratic-context", type=POSITIVE_INT, default=32768,
                   help="Transformer contexts above this are extrapolated, not run")
    p.add_argument("--threads", type=NATURAL, default=0, help="torch threads (0: torch's choice)")
    add_seed(p)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG of memory, prefill time and throughput against context here")
    p.add_argument("--markdown", help="write the table and the ratios as Markdown here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("kv-table", help="KV-cache bytes per token of every architecture: formula and measured")
    archs(p, ("every one",))
    p.add_argument("--preset", choices=["all"] + sorted(PRESETS), default="all", help="size preset")
    p.add_argument("--context", type=TokenCount(1), default=4096, help="context at which caches are measured")
    add_dtype(p)
    p.set_defaults(func=cmd_kv_table)

    p = sub.add_parser("convert", help="uptraining start points: pool K/V heads (MHA -> GQA -> MQA) and/or "
                                       "share K/V across layers (CLA, MLKV)")
    p.add_argument("--checkpoint", help="a saved transformer model folder (a run folder: its latest checkpoint)")
    p.add_argument("--from-llama", help="a local transformers Llama folder: converted to the yoco transformer "
                                        "with identical logits (then optionally pooled/shared)")
    p.add_argument("--kv-heads", type=POSITIVE_INT, help="the new number of K/V heads")
    p.add_argument("--cla-factor", type=POSITIVE_INT, help="CLA: one K/V-producing layer per S layers")
    p.add_argument("--mlkv-layers", type=POSITIVE_INT, help="MLKV: this many K/V-producing layers")
    p.add_argument("--out", required=True, help="output model folder (with the source's tokenizer)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train an architecture on text (default corpus: the stdlib's own sources)")
    p.add_argument("--arch", choices=NAMES, default="yoco-swa", help="architecture (one; several: yoco study)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size preset")
    p.add_argument("--data", action="append", help="a text file, folder or JSONL file (repeatable; default: the "
                                                     "Python standard library's .py sources)")
    p.add_argument("--out", required=True, help="run folder: data/, metrics.jsonl, checkpoint-<step>/")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    add_training_flags(p, steps=200)
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=3e-3, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--warmup", type=NATURAL, default=20, help="warmup steps")
    p.add_argument("--grad-clip", type=POSITIVE, default=1.0, help="gradient norm clip")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=50, help="steps between validation losses")
    p.add_argument("--save-every", type=POSITIVE_INT, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=POSITIVE_INT, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: replicate (DDP) or shard with FSDP2 (fully_shard per block)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the matmuls")
    p.add_argument("--retrieval-mix", type=SHARE, default=0.0,
                   help="share of each batch given to synthetic retrieval rows (e.g. 0.25), scored on their "
                        "retrieval targets only")
    add_curriculum_flags(p)
    p.add_argument("--window", type=POSITIVE_INT,
                   help="sliding window (yoco-swa's self-decoder; for transformer, every layer; default: the preset's "
                        "for yoco-swa and swa, none otherwise)")
    p.add_argument("--init-from", help="start from this checkpoint's weights (same model and tokenizer; a new schedule)")
    add_seed(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss, passkey retrieval heatmap and MQAR of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a model folder, or a training run folder (its latest)")
    p.add_argument("--data", help="token shard folder (default: the run's data/ beside the checkpoint)")
    p.add_argument("--contexts", type=ListOf(TokenCount(1), "context lengths"), default="256,512,1024",
                   help="passkey context lengths, comma-separated")
    p.add_argument("--depths", type=ListOf(DEPTH, "depths"), default="0,0.25,0.5,0.75,1",
                   help="needle depths, comma-separated (0 = start, 1 = end)")
    p.add_argument("--trials", type=POSITIVE_INT, default=4, help="keys per (context, depth) cell")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="validation rows per batch")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per validation row")
    p.add_argument("--batches", type=POSITIVE_INT, default=16,
                   help="validation batches, from the start of the held-out split")
    p.add_argument("--mqar-samples", type=POSITIVE_INT, default=32, help="MQAR sequences")
    p.add_argument("--mqar-pairs", type=POSITIVE_INT, default=16, help="key-value pairs per MQAR sequence")
    p.add_argument("--mqar-queries", type=POSITIVE_INT, default=8, help="keys queried per MQAR sequence")
    add_dtype(p)
    add_seed(p)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write the passkey heatmap PNG here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress-eval", help="KV-cache compression policies side by side: passkey, perplexity, "
                                             "cache bytes, decode speed")
    p.add_argument("--model", default=DEFAULT_COMPRESS_MODEL,
                   help="a yoco checkpoint (a run folder: its latest) or a transformers Llama/Mistral/Qwen2 folder")
    p.add_argument("--policy", default="streamingllm,snapkv,pyramidkv,h2o,corm,infllm",
                   help="comma-separated policies (streamingllm, snapkv, pyramidkv, h2o, corm, infllm), each "
                        "with options as name:option=value[:...], e.g. infllm:positions=true:topk=4")
    p.add_argument("--budget", type=ListOf(budget, "budgets"), default="0.25",
                   help="comma-separated budgets: ratios in (0, 1], token counts, or none (CORM's rule alone; "
                        "InfLLM's paper sizes). InfLLM's budget is its attention window (a ratio: of --context)")
    p.add_argument("--data", help="token shard folder (default: data/ beside the model folder)")
    p.add_argument("--context", type=POSITIVE_INT, default=1024,
                   help="prompt tokens (passkey prompts and the perplexity prefix)")
    p.add_argument("--depths", type=ListOf(DEPTH, "depths"), default="0,0.25,0.5,0.75",
                   help="passkey needle depths, comma-separated")
    p.add_argument("--trials", type=POSITIVE_INT, default=4, help="keys per depth")
    p.add_argument("--ppl-rows", type=POSITIVE_INT, default=4,
                   help="held-out rows decoded together for perplexity and speed")
    p.add_argument("--ppl-tokens", type=POSITIVE_INT, default=64, help="tokens scored after each row's prefix")
    add_dtype(p)
    add_seed(p)
    p.add_argument("--json", help="write the results as JSON here (and a Markdown table beside it)")
    p.add_argument("--markdown", help="write the Markdown table here (default: the JSON path with .md)")
    p.add_argument("--plot", help="write accuracy and perplexity against cache size as a PNG here")
    p.set_defaults(func=cmd_compress_eval)

    p = sub.add_parser("study", help="train architectures at matched parameters and compare quality vs cache")
    archs(p, STUDY_ARCHS, extra="; swa is the window-only control")
    p.add_argument("--quick", action="store_true", help="400 steps per architecture (about 14 minutes on 2 cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="size preset")
    add_training_flags(p, steps=None)
    p.add_argument("--retrieval-mix", type=SHARE, default=0.25,
                   help="share of each batch given to synthetic retrieval rows")
    add_curriculum_flags(p)
    p.add_argument("--window", type=POSITIVE_INT, help="sliding window of the windowed architectures (yoco-swa, swa); "
                                                        "default: the preset's")
    p.add_argument("--data", action="append", help="corpus paths (default: the stdlib's sources)")
    p.add_argument("--trials", type=POSITIVE_INT, help="passkey keys per cell (default: 4; 2 with --quick)")
    p.add_argument("--val-batches", type=POSITIVE_INT, help="batches for the final validation loss (default: the "
                                                            "whole held-out split)")
    add_seed(p)
    p.add_argument("--out", required=True, help="study folder: data/, one run folder per architecture, results")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("generate", help="generate text or token ids from a model")
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (encoded by the checkpoint's tokenizer.json; a random model: bytes)")
    prompt.add_argument("--prompt-ids", type=token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=POSITIVE_INT, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=PROBABILITY, help="sample among the likeliest tokens holding this probability "
                                                       "(default: all)")
    p.add_argument("--stop", type=NATURAL, action="append", default=[],
                   help="stop token id (repeatable; a trained tokenizer's end of text always stops)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=1024, help="prompt tokens per prefill call")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("init", help="write a randomly initialised model folder")
    p.add_argument("--arch", choices=NAMES, required=True, help="architecture")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size preset")
    p.add_argument("--out", required=True, help="output folder")
    add_dtype(p)
    add_seed(p, "seed for the weights")
    p.set_defaults(func=cmd_init)
    return parser


def add_training_flags(p: argparse.ArgumentParser, steps: int | None) -> None:
    """What ``yoco train`` and ``yoco study`` both set: the tokenizer's size and the batches."""
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=4096, help="ids of the BPE tokenizer trained on the corpus")
    if steps is None:
        p.add_argument("--steps", type=POSITIVE_INT, help="training steps per architecture (default: 2000; 400 with "
                                                          "--quick)")
    else:
        p.add_argument("--steps", type=POSITIVE_INT, default=steps, help="training steps")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="rows per batch")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per row")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad option, already named on one line (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (UsageError, InputError, ConfigError, CheckpointError, CacheError, BenchError, DataError,
            BudgetError) as e:
        print(f"yoco {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
