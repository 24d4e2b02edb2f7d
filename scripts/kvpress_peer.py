"""The kvpress side of ``scripts/kvpress-peer.sh``: NVIDIA kvpress's presses on a transformers Llama folder,
answering the prompts ``scripts/kvpress_compare.py`` wrote, in kvpress's own virtual environment (kvpress
pins transformers < 5.3). It imports nothing of yoco.

For each press and compression ratio (kvpress's: the share of the cache removed), each prompt is
prefilled whole under the press (``with press(model)``: kvpress's hooks compress every layer's cache
after its attention), then answered greedily as kvpress's pipeline answers (``generate_answer``: explicit
position ids after the prompt, stop at the model's eos). Per prompt it records the answer's token ids,
the bytes of the compressed cache's keys and values right after the prefill, and the prefill's time.

    .venv-kvpress/bin/python scripts/kvpress_peer.py --model DIR --prompts prompts.json --out peer.json \
        --presses snapkv,streamingllm --ratios 0.25,0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress import AdaKVPress, PyramidKVPress, SnapKVPress, StreamingLLMPress, TOVAPress

PRESSES = {
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio),
    "pyramidkv": lambda ratio: PyramidKVPress(compression_ratio=ratio),
    "adakv": lambda ratio: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
    "streamingllm": lambda ratio: StreamingLLMPress(compression_ratio=ratio),
    "tova": lambda ratio: TOVAPress(compression_ratio=ratio),
}


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.inference_mode()
def answer(model, ids: list[int], max_new_tokens: int, press) -> dict:
    input_ids = torch.tensor([ids])
    cache = DynamicCache()
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    nbytes = cache_bytes(cache)
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    generated = [int(logits[0, -1].argmax())]
    position = len(ids)
    while len(generated) < max_new_tokens and generated[-1] not in stop:
        logits = model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache,
                       position_ids=torch.tensor([[position]])).logits
        generated.append(int(logits[0, -1].argmax()))
        position += 1
    return {"tokens": generated, "cache_bytes": nbytes, "prefill_s": prefill_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON: [{task, ids, max_new_tokens}, ...]")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ratios", default="0.25,0.5,0.75,0.875")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    presses = [n for n in args.presses.split(",") if n]
    unknown = [n for n in presses if n not in PRESSES]
    if unknown:
        print(f"kvpress_peer.py: unknown press {', '.join(unknown)}; choose from {', '.join(PRESSES)}", file=sys.stderr)
        return 2
    ratios = [float(r) for r in args.ratios.split(",") if r]
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.prompts).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    runs = [("full", None)] + [(name, ratio) for name in presses for ratio in ratios]
    results = []
    for name, ratio in tqdm(runs, desc="kvpress", unit="run", file=sys.stderr):
        press = None if name == "full" else PRESSES[name](ratio)
        results.append({"press": name, "ratio": ratio,
                        "answers": [answer(model, q["ids"], q["max_new_tokens"], press) for q in prompts]})
    report = {"kvpress": version("kvpress"),  # (the package has no __version__)
              "transformers": transformers.__version__, "torch": torch.__version__, "results": results}
    tmp = Path(args.out).with_suffix(".partial")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
