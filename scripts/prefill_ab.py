"""Prefill A/B of this library's Transformer against transformers' Llama (same dimensions, random
weights, as ``yoco bench`` builds them): the two prefills alternate, so a noisy machine slows both
alike, and the minimum and median of each are printed.

    .venv/bin/python scripts/prefill_ab.py --context 1K --repeats 12
"""

from __future__ import annotations

import argparse
import time

import torch

from yoco.arguments import TokenCount
from yoco.bench import BenchSettings, make_runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=TokenCount(2), default=1024)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--archs", default="transformer,hf-llama")
    args = p.parse_args()
    runners = {a: make_runner(a, BenchSettings(archs=(a,), contexts=(args.context,), dtype=args.dtype))
               for a in args.archs.split(",")}
    vocab = next(iter(runners.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {a: [] for a in runners}
    with torch.inference_mode():
        for runner in runners.values():  # warm-up
            runner.prefill(ids, args.context + 8)
            runner.reset()
        for _ in range(args.repeats):
            for arch, runner in runners.items():
                began = time.perf_counter()
                runner.prefill(ids, args.context + 8)
                times[arch].append(time.perf_counter() - began)
                runner.reset()
    for arch, taken in times.items():
        taken.sort()
        print(f"{arch:12s} {args.context:>7,} tokens, {args.dtype}: min {taken[0]:.3f} s, "
              f"median {taken[len(taken) // 2]:.3f} s over {len(taken)}")


if __name__ == "__main__":
    main()
