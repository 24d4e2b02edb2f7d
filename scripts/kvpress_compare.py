"""yoco's compression policies beside NVIDIA kvpress's presses: the same transformers Llama folder, the same
RULER-style prompts (``yoco.ruler``), the same compression ratios; run by ``scripts/kvpress-peer.sh``.

The prompts are written to ``OUT/prompts.json``; the peer (``scripts/kvpress_peer.py``, in kvpress's own
virtual environment with the transformers it pins) answers them first, then yoco's engine answers them
with the matching policy, one after the other (never both at once: two cores). Each side prefills the
whole prompt, compresses it, and answers greedily, stopping at the model's eos. Per press and ratio the
table gives each side's passkey accuracy and mean accuracy over the RULER-style tasks (whole-word match),
K/V bytes kept after the prompt, mean prefill time, and how many answers are token for token the same.

The presses and yoco's policies (budget = 1 - ratio):
- SnapKV, PyramidKV, AdaKV: yoco's with kvpress's observation window (64 queries; kernel 5 on both);
- StreamingLLM (4 sinks), TOVA: the same budget; both of yoco's keep it while decoding (kvpress's
  compress the prompt only), and yoco's StreamingLLM moves the sinks next to the recent tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from yoco.arguments import POSITIVE_INT, ListOf
from yoco.checkpoint import load_any_model
from yoco.compress import policy_for_context
from yoco.compression_eval import cache_nbytes
from yoco.engine import stream
from yoco.errors import YocoError
from yoco.evaluate import haystack_for
from yoco.report import write_json, write_markdown
from yoco.ruler import RULER_TASKS, TaskPrompt, suite, task_scores
from yoco.tasks import passkey_key, passkey_prompt
from yoco.tokenizer import tokenizer_for
from yoco.commands.common import config_eos_token_id, held_out_shards, held_out_split, text_shards

# kvpress press -> yoco policy spec with kvpress's defaults where yoco's differ
POLICY_OF_PRESS = {
    "snapkv": "snapkv:window=64:kernel_size=5",
    "pyramidkv": "pyramidkv:window=64:kernel_size=5",
    "adakv": "adakv:window=64:kernel_size=5",
    "streamingllm": "streamingllm:n_sink=4",
    "tova": "tova",
}


def answer(model, ids: list[int], max_new_tokens: int, policy, eos: set[int]) -> dict:
    """The prompt prefilled whole and compressed by ``policy`` (None: not), then answered greedily by the
    engine: the answer's tokens, the K/V bytes held right after the prefill (the engine yields its first
    token before any decode step) and the prefill's time, as the peer records them."""
    generation = stream(model, [ids], max_new_tokens, stop_tokens=sorted(eos), prefill_chunk=len(ids),
                        compression=policy)
    steps = iter(generation)
    next(steps)
    nbytes = cache_nbytes(model, generation.cache, 1, len(ids))
    for _ in steps:
        pass
    result = generation.result()
    return {"tokens": result.tokens[0], "cache_bytes": nbytes, "prefill_s": result.prefill_s}


def passkeys(encode, haystack, context: int, samples: int, seed: int) -> list[TaskPrompt]:
    """``samples`` passkey prompts (the task yoco's models train on; the RULER-style ones are new to them)
    at depths spread over the prompt, as ``TaskPrompt``s scored like the others."""
    rng = random.Random(f"{seed}:passkey")
    prompts = []
    for i in range(samples):
        key = passkey_key(rng)
        start = rng.randrange(0, max(1, len(haystack) - context))
        prompt = passkey_prompt(encode, haystack[start:], context, i / max(1, samples - 1) * 0.9, key)
        prompts.append(TaskPrompt("passkey", prompt.ids, [key], len(encode(" " + key))))  # as passkey_grid asks
    return prompts


def summary(prompts, answers, decode) -> dict:
    acc = task_scores(prompts, [decode(a["tokens"]) for a in answers])
    return {"task_acc": acc, "task_mean": sum(acc.values()) / len(acc),
            "cache_bytes": statistics.mean(a["cache_bytes"] for a in answers),
            "prefill_s": statistics.mean(a["prefill_s"] for a in answers)}


def compare(prompts, ours: dict, peer: dict, decode) -> list[dict]:
    """One row per (press, ratio): both sides' summaries and how many answers agree token for token."""
    rows = []
    for key, peer_answers in peer.items():
        mine = ours[key]
        rows.append({"press": key[0], "ratio": key[1], "yoco": summary(prompts, mine, decode),
                     "kvpress": summary(prompts, peer_answers, decode),
                     "same_answers": sum(a["tokens"] == b["tokens"] for a, b in zip(mine, peer_answers)),
                     "prompts": len(prompts)})
    return rows


def markdown(rows: list[dict], versions: dict) -> str:
    lines = [f"yoco (transformers {versions['yoco_transformers']}) against kvpress {versions['kvpress']} "
             f"(transformers {versions['kvpress_transformers']}); RULER: the mean over the RULER-style tasks",
             "",
             "| press | ratio | passkey yoco | passkey kvpress | RULER yoco | RULER kvpress | kept KiB yoco "
             "| kept KiB kvpress | prefill s yoco | prefill s kvpress | same answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(side: dict, passkey: bool) -> str:
        scores = [v for task, v in side["task_acc"].items() if (task == "passkey") == passkey]
        return f"{sum(scores) / len(scores):.0%}" if scores else "-"

    for r in rows:
        y, k = r["yoco"], r["kvpress"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        lines.append(f"| {r['press']} | {ratio} | {cell(y, True)} | {cell(k, True)} | {cell(y, False)} | "
                     f"{cell(k, False)} | {y['cache_bytes'] / 1024:,.0f} | {k['cache_bytes'] / 1024:,.0f} | "
                     f"{y['prefill_s']:.3f} | {k['prefill_s']:.3f} | {r['same_answers']}/{r['prompts']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a transformers Llama folder (e.g. `yoco convert --to-llama`)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--data", help="token shard folder (default: data/ beside the model folder)")
    text.add_argument("--text", help="held-out text: a file or a folder of text files")
    p.add_argument("--context", type=POSITIVE_INT, default=1024)
    p.add_argument("--presses", default=",".join(POLICY_OF_PRESS))
    p.add_argument("--ratios", type=ListOf(float, "ratios"), default="0.25,0.5,0.75,0.875",
                   help="kvpress's compression ratios: the share removed")
    p.add_argument("--tasks", default=",".join(RULER_TASKS))
    p.add_argument("--samples", type=POSITIVE_INT, default=4, help="prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", required=True, help="the python of kvpress's virtual environment")
    p.add_argument("--out", default="runs/kvpress", help="folder of prompts.json, kvpress.json, results.json/.md")
    args = p.parse_args(argv)
    presses = [n for n in args.presses.split(",") if n]
    bad = [n for n in presses if n not in POLICY_OF_PRESS]
    if bad or any(not 0 < r < 1 for r in args.ratios):
        print(f"kvpress_compare.py: presses from {', '.join(POLICY_OF_PRESS)}, ratios in (0, 1)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_any_model(args.model, "fp32")
    tokenizer = tokenizer_for(args.model, model.config.vocab_size, exact=False)
    data = text_shards(args.model, args.text, None, out) if args.text else held_out_shards(args.model, args.data)
    haystack = haystack_for(held_out_split(data, args.context + 1).tokens, args.context)[0]
    prompts = passkeys(tokenizer.encode, haystack, args.context, args.samples, args.seed) + suite(
        [t for t in args.tasks.split(",") if t], tokenizer.encode, haystack, args.context, args.samples, args.seed)
    write_json([{"task": q.task, "ids": q.ids, "answers": q.answers, "max_new_tokens": q.max_new_tokens}
                for q in prompts], out / "prompts.json")
    print(f"{len(prompts)} prompts of {args.context} tokens; kvpress answers first", file=sys.stderr)
    subprocess.run([args.peer_python, str(Path(__file__).with_name("kvpress_peer.py")), "--model", args.model,
                    "--prompts", str(out / "prompts.json"), "--presses", ",".join(presses),
                    "--ratios", ",".join(map(str, args.ratios)), "--out", str(out / "kvpress.json")], check=True)
    peer_report = json.loads((out / "kvpress.json").read_text())
    peer = {(r["press"], r["ratio"]): r["answers"] for r in peer_report["results"]}

    from tqdm import tqdm
    from transformers import __version__ as transformers_version

    eos = config_eos_token_id(args.model)  # the peer stops there too
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ours = {}
    for press, ratio in tqdm(list(peer), desc="yoco", unit="run", file=sys.stderr):
        policy = None if press == "full" else policy_for_context(POLICY_OF_PRESS[press], 1 - ratio, args.context)
        ours[(press, ratio)] = [answer(model, q.ids, q.max_new_tokens, policy, eos) for q in prompts]
    decode = tokenizer.decode
    rows = compare(prompts, ours, peer, decode)
    versions = {"yoco_transformers": transformers_version, "kvpress": peer_report["kvpress"],
                "kvpress_transformers": peer_report["transformers"]}
    table = markdown(rows, versions)
    print(table, end="")
    write_json({"model": args.model, "context": args.context, "samples": args.samples, "seed": args.seed,
                **versions, "rows": rows}, out / "results.json")
    write_markdown(table, out / "results.md")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except YocoError as e:  # bad input: one line, exit status 2, as the yoco command does
        print(f"kvpress_compare.py: {e}", file=sys.stderr)
        sys.exit(2)
