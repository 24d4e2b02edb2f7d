"""Profile a whole model's prefill and decode as ``yoco bench`` runs them (random weights, the engine's
chunked prefill, greedy decode steps at batch 1): wall times and torch.profiler's operator tables.

    .venv/bin/python scripts/profile_model.py --arch transformer --context 8K
    .venv/bin/python scripts/profile_model.py --arch hf-llama --context 8K --dtype bf16
    .venv/bin/python scripts/profile_model.py --arch yoco-swa --context 1M --phase decode
    .venv/bin/python scripts/profile_model.py --arch yoco-swa --context 8K --phase train --dtype bf16

``--phase train`` profiles one training step of a yoco model as ``yoco bench --train`` takes it (forward
with the loss, backward, clipping, AdamW; ``--dtype bf16`` autocasts), after one untimed step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from yoco.allocator import retain_freed_memory
from yoco.arguments import TokenCount
from yoco.bench import BenchSettings, make_runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="transformer", help="any of yoco bench's architectures (hf-llama too)")
    p.add_argument("--preset", default="40m")
    p.add_argument("--context", type=TokenCount(2), default=8192)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--prefill-chunk", type=int, default=BenchSettings.prefill_chunk)
    p.add_argument("--phase", choices=("prefill", "decode", "both", "train"), default="both")
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled (after 2 untimed)")
    p.add_argument("--rows", type=int, default=20, help="operator rows to print")
    p.add_argument("--compile", action="store_true", help="decode with the step torch.compile captured")
    args = p.parse_args()
    retain_freed_memory()  # as the yoco CLI runs (freed activations reused, not faulted in again)
    if args.phase == "train":
        return profile_training(args)
    settings = BenchSettings(archs=(args.arch,), contexts=(args.context,), preset=args.preset, dtype=args.dtype,
                             prefill_chunk=args.prefill_chunk, new_tokens=args.steps + 2,
                             compile=args.compile)
    runner = make_runner(args.arch, settings)
    ids = torch.randint(0, runner.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    capacity = args.context + args.steps + 3
    with torch.inference_mode():
        runner.prefill(ids[:, : min(args.context, 256)], capacity)  # warm-up: kernels built, threads up
        if args.phase in ("prefill", "both"):
            with profile() as prof:
                began = time.perf_counter()
                logits = runner.prefill(ids, capacity)
                took = time.perf_counter() - began
            print(f"{args.arch} ({args.preset}, {args.dtype}) prefill of {args.context:,} tokens: {took:.2f} s "
                  f"(under the profiler)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        else:
            logits = runner.prefill(ids, capacity)
        if args.phase in ("decode", "both"):
            tokens = logits.argmax(-1)
            for _ in range(2):
                tokens = runner.decode(tokens).argmax(-1)
            with profile() as prof:
                began = time.perf_counter()
                for _ in range(args.steps):
                    tokens = runner.decode(tokens).argmax(-1)
                took = time.perf_counter() - began
            print(f"{args.arch} decode at {args.context:,}: {args.steps / took:.2f} tok/s (under the profiler)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def profile_training(args) -> None:
    from yoco.bench_train import TrainBenchSettings, train_config, yoco_training

    settings = TrainBenchSettings(archs=(args.arch,), seq_lens=(args.context,), preset=args.preset, dtype=args.dtype)
    _, step = yoco_training(train_config(args.arch, settings), settings, args.context)
    step(0)
    with profile() as prof:
        began = time.perf_counter()
        step(1)
        took = time.perf_counter() - began
    print(f"{args.arch} ({args.preset}, {args.dtype}) training step on {args.context:,}-token rows: {took:.2f} s "
          f"(under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

if __name__ == "__main__":
    main()
