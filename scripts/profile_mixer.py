"""Profile one self-decoder layer's token mixer of a YOCO architecture on one prefill call through its
cache: the call's wall time (mean of 10, after 3 warm-ups) and torch.profiler's operator table.

    .venv/bin/python scripts/profile_mixer.py --arch yoco-gdn --preset 40m --tokens 2048
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from yoco import build_model
from yoco.layers import Step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="yoco-gdn")
    p.add_argument("--preset", default="40m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rows", type=int, default=15, help="operator rows to print")
    args = p.parse_args()
    model = build_model(args.arch, preset=args.preset, seed=0)
    if not model.config.is_yoco:
        p.error(f"{args.arch} has no self-decoder")
    mixer = model.self_layers[0].mixer
    x = torch.randn(1, args.tokens, model.config.dim, generator=torch.Generator().manual_seed(0))
    step = Step(0, args.tokens, None, x.device)
    with torch.inference_mode():
        def call():  # a prompt's first call: through a new cache, as a prefill writes it
            return mixer(x, step, mixer.new_cache(1, dtype=x.dtype, device="cpu", capacity=args.tokens))
        for _ in range(3):
            call()
        began = time.perf_counter()
        for _ in range(10):
            call()
        print(f"{type(mixer).__name__} ({args.arch}, {args.preset}), one call of {args.tokens} tokens: "
              f"{(time.perf_counter() - began) / 10 * 1e3:.1f} ms")
        with profile() as prof:
            call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
