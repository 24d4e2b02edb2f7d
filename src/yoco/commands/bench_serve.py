"""``yoco bench-serve``: servers under the same load of concurrent streaming clients, one after the other."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from ..arguments import POSITIVE, POSITIVE_INT, TokenCount
from ..config import NAMES
from .common import UsageError, add_archs, add_dtype, add_seed

DEFAULT_ARCHS = ("yoco-swa", "transformer", "hf-serve")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-serve", help="servers under the same load of concurrent clients: throughput, "
                                                  "concurrency, latency, memory")
    add_archs(p, DEFAULT_ARCHS, known=("hf-serve",) + NAMES, extra="; hf-serve: transformers serve "
                                                                   "--continuous-batching")
    p.add_argument("--context", type=TokenCount(2), default=16384, help="prompt tokens per request (e.g. 16K)")
    p.add_argument("--kv-budget-gib", type=POSITIVE, default=1.0, help="KV cache memory each server gets")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=128, help="tokens generated per request")
    p.add_argument("--concurrency", type=POSITIVE_INT, default=64, help="concurrent clients")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=POSITIVE, help="seconds of load per server (default 600)")
    bound.add_argument("--requests", type=POSITIVE_INT, help="requests per server, instead of a duration")
    p.add_argument("--url", help="load a running server at this /v1 URL instead of starting each (one --arch: "
                                 "the model's name)")
    p.add_argument("--preset", default="40m", help="size preset of the models")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=4096,
                   help="yoco serve's --prefill-chunk: prompt tokens per iteration (4096: a 16K-token prompt then "
                        "takes 4 iterations while a stream of 128 tokens lives 128, so about 32 sequences stream at "
                        "once, and an iteration stays short; see the README)")
    p.add_argument("--workdir", default="runs/bench-serve", help="model folders, the tokenizer, server logs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG plot here")
    add_dtype(p)
    add_seed(p, "seed of the random weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..bench import busy_warning, measure_machine, probe
    from ..config import PRESETS
    from ..report import write_json
    from ..serve.bench import ServeBenchSettings, bench_one, bench_tokenizer, markdown_table, plot, ratio_lines

    archs = tuple(args.arch or DEFAULT_ARCHS)
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    if args.url and len(archs) != 1:
        raise UsageError("--url loads one running server: give exactly one --arch (its model's name)")
    settings = ServeBenchSettings(archs, args.context, args.kv_budget_gib, args.new_tokens, args.concurrency,
                                  None if args.requests else (args.duration or 600.0), args.requests, args.preset,
                                  args.prefill_chunk, dtype=args.dtype, seed=args.seed, workdir=args.workdir,
                                  url=args.url)
    Path(settings.workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer(Path(settings.workdir), PRESETS[args.preset]["vocab_size"])
    rows = []
    started = time.perf_counter()
    for arch in archs:
        total = settings.requests or int(settings.duration)
        with tqdm(total=total, desc=arch, unit="req" if settings.requests else "s") as bar:
            def progress(done: int, elapsed: float) -> None:
                bar.n = done if settings.requests else min(total, int(elapsed))
                bar.set_postfix_str(f"{done} done")
                bar.refresh()

            before = measure_machine(torch.float32)  # the machine probe around each server's run
            row = bench_one(arch, settings, tokenizer, progress)
            row["machine"] = probe(before, measure_machine(torch.float32))
            rows.append(row)
    report = {"settings": asdict(settings), "results": rows,
              "wall_s": time.perf_counter() - started}
    print(markdown_table(rows))
    for line in ratio_lines(rows):
        print(line)
    for row in rows:
        warning = busy_warning(row["machine"])
        if warning:
            print(f"{row['arch']}: {warning}")
        if row["errors"]:
            print(f"{row['arch']}: {row['failed']} failed, e.g. {row['errors'][0]}")
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(rows, args.plot)
    return 0
