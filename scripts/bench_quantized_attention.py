"""One decode layer-step of attention over a long K/V cache: full precision against 8-, 4- and 2-bit
quantized caches, each through the native kernel and through the PyTorch path (SDPA for full precision),
in one process.

    .venv/bin/python scripts/bench_quantized_attention.py [--positions 262144] [--repeats 10]

The geometry is the 40m preset's (2 K/V heads of 64 channels, 8 query heads); the cache holds random
keys and values. Prints milliseconds per layer-step (the median of --repeats) and the cache's bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from yoco import native
from yoco.cache import KVCache, KVGeometry
from yoco.layers import Step
from yoco.quantize import KVQuantization, QuantizedKV

KV_HEADS, DIM, HEADS = 2, 64, 8
FILL = 65536  # positions appended at a time


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def timed(cache, q: torch.Tensor, step: Step, repeats: int) -> float:
    cache.attend(q, step)  # warm-up (and the kernel's build)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache.attend(q, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def filled(cache, positions: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, positions, FILL):
        n = min(FILL, positions - start)
        cache.append(torch.randn(1, KV_HEADS, n, DIM, generator=g), torch.randn(1, KV_HEADS, n, DIM, generator=g))
    cache.append(torch.randn(1, KV_HEADS, 1, DIM, generator=g), torch.randn(1, KV_HEADS, 1, DIM, generator=g))
    return cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=positive, default=262144, help="cached positions (default: 262144)")
    parser.add_argument("--repeats", type=positive, default=10, help="timed layer-steps per row (default: 10)")
    args = parser.parse_args(argv)
    N = args.positions
    q = torch.randn(1, HEADS, 1, DIM, generator=torch.Generator().manual_seed(1))
    step = Step(N, 1, None, torch.device("cpu"))
    print(f"decode attention, one layer-step over {N} positions ({KV_HEADS} K/V heads x {DIM}, {HEADS} query heads), "
          f"{torch.get_num_threads()} threads; native kernel: {'built' if native.library() else 'not available'}")
    print(f"{'cache':<16} {'path':<8} {'ms':>8} {'MiB':>9}")
    with torch.inference_mode():
        for bits in (32, 8, 4, 2):
            cache = filled(KVCache(1, KV_HEADS, DIM, dtype=torch.float32, capacity=N + 1) if bits == 32 else
                           QuantizedKV(KVGeometry(KV_HEADS, DIM, DIM), KVQuantization(bits), 1, dtype=torch.float32,
                                       capacity=N + 1), N, seed=0)
            for path, setting in (("native", "1"), ("pytorch", "0")):  # pytorch: SDPA for fp32
                os.environ["YOCO_NATIVE"] = setting
                if path == "native" and native.library() is None:
                    continue
                print(f"{'fp32' if bits == 32 else f'{bits}-bit':<16} {path:<8} {timed(cache, q, step, args.repeats):8.2f} "
                      f"{cache.nbytes() / 2**20:9.1f}")
            os.environ.pop("YOCO_NATIVE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
