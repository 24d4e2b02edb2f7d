"""Profile yoco serve's scheduler alone (no HTTP) under the bench-serve load: C prompts of N random ids,
each replaced by a new one when it ends, for S seconds; prints tokens/s, how many sequences decoded at
once, the time of the iterations that advanced a prefill against those that did not, and of a decode step
(second half).

    .venv/bin/python scripts/profile_scheduler.py runs/bench-serve/models/yoco-swa-40m-16768 --seconds 600

(the model folders are the ones `yoco bench-serve` writes).
"""

from __future__ import annotations

import argparse
import time

import torch

from yoco.checkpoint import load_model
from yoco.engine import SamplingParams
from yoco.serve.scheduler import Request, Scheduler
from yoco.tokenizer import tokenizer_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-budget-gib", type=float, default=1.0)
    p.add_argument("--prefill-chunk", type=int, default=8192)
    args = p.parse_args()
    model = load_model(args.model, dtype="fp32").eval()
    scheduler = Scheduler(model, tokenizer_for(args.model, model.config.vocab_size),
                          kv_budget=int(args.kv_budget_gib * (1 << 30)), prefill_chunk=args.prefill_chunk)
    generator = torch.Generator().manual_seed(0)

    def submit() -> None:
        ids = torch.randint(10, model.config.vocab_size, (args.prompt,), generator=generator).tolist()
        scheduler.submit(Request(ids, args.new_tokens, SamplingParams(),
                                 emit=lambda e: submit() if e.finish_reason is not None else None))

    for _ in range(args.clients):
        submit()
    advanced = []  # whether this iteration advanced a prefill
    advance = scheduler._advance_prefill

    def advance_and_note(sequence):
        advanced.append(True)
        return advance(sequence)

    scheduler._advance_prefill = advance_and_note
    decode_times = []  # seconds of each iteration's decode step
    decode = scheduler._decode

    def decode_and_time(sequences):
        began = time.perf_counter()
        decode(sequences)
        decode_times.append((began - start, time.perf_counter() - began, len(sequences)))

    scheduler._decode = decode_and_time
    log = []  # (start, seconds, advanced a prefill, sequences decoding, tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < args.seconds:
            began, decoding, tokens = time.perf_counter(), len(scheduler.running), scheduler.metrics.generation_tokens
            advanced.clear()
            scheduler.step()
            log.append((began - start, time.perf_counter() - began, bool(advanced), decoding,
                        scheduler.metrics.generation_tokens - tokens))
    late = [r for r in log if r[0] > args.seconds / 2]
    with_chunk, without = [r[1] for r in late if r[2]], [r[1] for r in late if not r[2]]
    elapsed = sum(r[1] for r in late)
    print(f"whole run: {scheduler.metrics.generation_tokens / (time.perf_counter() - start):.2f} tok/s")
    print(f"second half: {len(late)} iterations, {sum(r[4] for r in late) / elapsed:.2f} tok/s, "
          f"{sum(r[3] for r in late) / len(late):.1f} sequences decoding on average; "
          f"{len(with_chunk)} advanced a prefill (mean {sum(with_chunk) / max(1, len(with_chunk)):.2f} s), "
          f"{len(without)} did not (mean {sum(without) / max(1, len(without)):.2f} s)")
    steps = [d for d in decode_times if d[0] > args.seconds / 2]
    if steps:
        print(f"second half: a decode step took {sum(d[1] for d in steps) / len(steps):.3f} s on average for "
              f"{sum(d[2] for d in steps) / len(steps):.1f} sequences")


if __name__ == "__main__":
    main()
