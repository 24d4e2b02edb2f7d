"""``yoco demo``: each architecture at one size generates from the same random prompt; their caches
side by side."""

from __future__ import annotations

import argparse
import sys

import torch

from ..arguments import POSITIVE_INT
from ..config import PRESETS
from ..engine import generate
from ..models import build_model, cache_growth_per_token, resolve_dtype
from ..report import format_bytes, print_table, times
from .common import add_archs, add_dtype, add_seed

DEMO_ARCHS = ("transformer", "yoco-swa", "yoco-gret")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build each architecture, generate, and compare cache sizes")
    add_archs(p, DEMO_ARCHS)
    p.add_argument("--preset", choices=sorted(PRESETS), default="40m", help="size preset")
    p.add_argument("--context", type=POSITIVE_INT, default=4096, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=16, help="tokens generated (greedy)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=1024, help="prompt tokens per prefill call")
    add_dtype(p)
    add_seed(p, "seed for the weights and the random prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    archs = args.arch or DEMO_ARCHS
    dtype = resolve_dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    rows, base_cache = [], None
    print(f"yoco demo: preset {args.preset}, {args.dtype}, prompt of {args.context} random tokens, "
          f"{args.new_tokens} new tokens (greedy), {torch.get_num_threads()} threads")
    for arch in tqdm(archs, desc="architectures", file=sys.stderr):
        model = build_model(arch, preset=args.preset, dtype=dtype, seed=args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=generator).tolist()
        result = generate(model, [prompt], args.new_tokens, prefill_chunk=args.prefill_chunk)
        per_token = cache_growth_per_token(model.config, dtype)
        base_cache = base_cache or result.cache_bytes
        rows.append([arch, f"{model.num_parameters() / 1e6:.1f}M", format_bytes(result.cache_bytes),
                     times(base_cache / result.cache_bytes, "smaller", "larger"), format_bytes(per_token),
                     f"{result.prefill_s:.2f}", f"{result.decode_tok_s:.1f}", " ".join(map(str, result.tokens[0][:6]))])
    print()
    print_table(["arch", "params", "cache", f"cache vs {archs[0]}", "growth/token", "prefill s", "decode tok/s",
                 "first tokens"], rows)
    return 0
