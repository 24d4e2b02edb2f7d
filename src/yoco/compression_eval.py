"""``yoco compress-eval``: every policy and budget side by side on one model, in one run. It evaluates
``yoco.compress`` from outside, beside the other evaluation code: nothing in ``compress/`` needs it.

For each (policy, budget), for the uncompressed cache as the reference row, and, at each asked bit
width (``kv_bits``; the row's ``kv_bits`` says which, the model's own dtype width for the others), for
the whole cache quantized and for each prompt-once policy's kept entries quantized:

- ``passkey_acc``: passkey retrieval at ``context`` tokens over the given needle depths (the prompt is
  compressed after prefill, then the key is generated greedily);
- ``task_acc`` / ``task_mean``: each asked task of the RULER-style suite (``yoco.ruler``: single needle,
  multi-key, multi-value, multi-query, variable tracking) at ``context`` tokens, the same prompts for
  every row, and their mean;
- ``ppl``: perplexity of ``ppl_tokens`` held-out tokens that follow a ``context``-token prefix, fed one
  by one through the compressed cache (teacher forcing: the policies that keep their budget while
  decoding keep evicting);
- ``decode_tok_s``: tokens per second of that decoding (all rows of the batch);
- ``cache_bytes``: the K/V bytes on the compute device right after the prompt was compressed,
  ``full_cache_bytes`` the same prompt's uncompressed cache (for YOCO both include the constant
  self-decoder caches); ``offloaded_bytes``: InfLLM's memory units, moved to CPU memory.

InfLLM's window is fixed before the prompt is read, so a ratio budget becomes ``ratio * context`` tokens.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .compress.policies import policy_for_context
from .data import DataError
from .engine import decode_step, generate, prefill
from .evaluate import haystack_for, passkey_grid
from .ruler import suite, task_scores


def cache_nbytes(model, cache, batch_size: int, context: int, kv_bits=None) -> int:
    """Bytes of a cache after ``context`` prompt tokens. An uncompressed yoco cache is preallocated to
    its capacity, so its prompt-only size comes from the config formula (tested equal to nbytes)."""
    if getattr(cache, "compression", None) is None and hasattr(model, "cache_bytes_formula"):
        return model.cache_bytes_formula(batch_size, context, next(model.parameters()).dtype, kv_bits=kv_bits)
    return cache.nbytes()


@torch.inference_mode()
def perplexity_and_speed(model, rows: torch.Tensor, context: int, policy, kv_bits=None) -> dict:
    """Teacher-forced NLL of rows[:, context:] after compressing rows[:, :context] (or with the cache
    quantized: ``kv_bits``)."""
    B, total = rows.shape
    cache = model.new_cache(B, capacity=total, compression=policy, kv_bits=kv_bits)
    logits = prefill(model, rows[:, :context], cache, chunk=1024)
    nbytes = cache_nbytes(model, cache, B, context, kv_bits)
    offloaded = getattr(cache, "offloaded_bytes", lambda: 0)()
    nll = [F.cross_entropy(logits.float(), rows[:, context], reduction="sum").item()]
    t0 = time.perf_counter()
    for t in range(context, total - 1):
        logits = decode_step(model, rows[:, t], cache)
        nll.append(F.cross_entropy(logits.float(), rows[:, t + 1], reduction="sum").item())
    elapsed = time.perf_counter() - t0
    steps = total - 1 - context
    return {"ppl": math.exp(sum(nll) / (B * (total - context))), "decode_tok_s": B * steps / elapsed if elapsed else
            float("nan"), "cache_bytes": nbytes, "offloaded_bytes": offloaded,
            "index_bytes": getattr(cache, "index_bytes", lambda: 0)()}


@torch.inference_mode()
def task_accuracy(model, tokenizer, prompts, compression=None, kv_bits=None, prefill_chunk: int = 1024) -> dict:
    """Each task's mean score over its prompts (``yoco.ruler.TaskPrompt``s), each answered greedily with
    the prompt's cache compressed after prefill (``compression``) or quantized (``kv_bits``)."""
    answers = [tokenizer.decode(generate(model, [prompt.ids], max_new_tokens=prompt.max_new_tokens,
                                         prefill_chunk=prefill_chunk, compression=compression,
                                         kv_bits=kv_bits).tokens[0]) for prompt in prompts]
    return task_scores(prompts, answers)


def compress_eval(model, tokenizer, haystack: Sequence[int], specs: Sequence[tuple[str, float | int | None]], *,
                  context: int, depths: Sequence[float], trials: int, ppl_rows: int, ppl_tokens: int, seed: int = 0,
                  progress=None, kv_bits: Sequence = (), tasks: Sequence[str] = (),
                  task_samples: int = 4) -> list[dict]:
    """One result row per (policy, budget) in ``specs`` (policy "full": no compression), then, for each
    quantization in ``kv_bits`` (``yoco.quantize.KVQuantization``s), one for the whole cache and one per
    (policy, budget) whose policy compresses the prompt once (SnapKV, PyramidKV, AdaKV). ``tasks``: the
    RULER-style tasks each row is scored on too, ``task_samples`` prompts each."""
    rng = random.Random(seed)
    prompts = suite(tasks, tokenizer.encode, haystack_for(haystack, context)[0], context, task_samples, seed)
    span = context + ppl_tokens
    if len(haystack) < span + ppl_rows:
        raise DataError(f"held-out text has {len(haystack)} tokens; {ppl_rows} rows of {span} need more")
    starts = [rng.randrange(0, len(haystack) - span) for _ in range(ppl_rows)]
    rows = torch.tensor([[int(t) for t in haystack[s:s + span]] for s in starts], dtype=torch.long,
                        device=next(model.parameters()).device)
    results, full_bytes = [], None
    own_bits = 8 * next(model.parameters()).dtype.itemsize
    # quantized rows: the whole cache, and each policy that compresses the prompt once (the others evict
    # while decoding, and kv_bits does not compose with them)
    composable = [(n, b) for n, b in specs
                  if n == "full" or not policy_for_context(n, b, context).keeps_budget_while_decoding]
    for name, budget, quantization in [(n, b, None) for n, b in specs] + [(n, b, q) for q in kv_bits
                                                                          for n, b in composable]:
        policy = None if name == "full" else policy_for_context(name, budget, context)
        measured = perplexity_and_speed(model, rows, context, policy, quantization)
        cells = passkey_grid(model, tokenizer, haystack, [context], depths, trials, seed, compression=policy,
                             kv_bits=quantization)
        if policy is None and quantization is None:
            full_bytes = measured["cache_bytes"]
        row = {"policy": name, "budget": budget, "kv_bits": own_bits if quantization is None else quantization.bits,
               **measured,
               "passkey_acc": sum(c["accuracy"] for c in cells) / len(cells),
               "passkey_by_depth": {str(c["depth"]): c["accuracy"] for c in cells}}
        if prompts:
            row["task_acc"] = task_accuracy(model, tokenizer, prompts, policy, quantization)
            row["task_mean"] = sum(row["task_acc"].values()) / len(row["task_acc"])
        results.append(row)
        if progress is not None:
            progress(row)
    for row in results:
        row["full_cache_bytes"] = full_bytes
        row["cache_ratio"] = row["cache_bytes"] / full_bytes if full_bytes else None
    return results


def markdown_table(results: list[dict]) -> str:
    from .report import format_bytes

    tasks = list(dict.fromkeys(t for r in results for t in r.get("task_acc", {})))
    extra = "".join(f" {t} |" for t in tasks) + (" task mean |" if tasks else "")
    lines = ["| policy | budget | kv bits | cache | of full | offloaded | passkey |" + extra + " ppl | decode tok/s |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + bool(tasks)) + "---|---|"]
    for r in results:
        budget = "-" if r["budget"] is None else str(r["budget"])
        offloaded = format_bytes(r["offloaded_bytes"]) if r.get("offloaded_bytes") else "-"
        scores = "".join(f" {r['task_acc'][t]:.0%} |" for t in tasks) + (f" {r['task_mean']:.0%} |" if tasks else "")
        lines.append(f"| {r['policy']} | {budget} | {r.get('kv_bits', '-')} | {format_bytes(r['cache_bytes'])} | "
                     f"{r['cache_ratio']:.1%} | "
                     f"{offloaded} | {r['passkey_acc']:.0%} |{scores} {r['ppl']:.2f} | {r['decode_tok_s']:.0f} |")
    return "\n".join(lines) + "\n"


def results_figure(results: list[dict], title: str):
    """Passkey accuracy and perplexity against the cache kept (share of the full cache), per policy."""
    from .report import plain_tick_labels, subplots

    fig, (acc, ppl) = subplots(1, 2, figsize=(10, 4))

    def series(r):  # a policy, the whole cache quantized at a width, or a policy's kept entries quantized
        if r.get("kv_bits") not in (2, 4, 8):
            return r["policy"]
        return f"{r['kv_bits']}-bit K/V" if r["policy"] == "full" else f"{r['policy']}, {r['kv_bits']}-bit"

    for name in dict.fromkeys(series(r) for r in results):
        mine = sorted((r for r in results if series(r) == name), key=lambda r: r["cache_ratio"])
        x = [r["cache_ratio"] for r in mine]
        style = dict(marker="*", markersize=12, linestyle="none", color="black") if name == "full" else dict(marker="o")
        acc.plot(x, [r["passkey_acc"] for r in mine], label=name, **style)
        ppl.plot(x, [r["ppl"] for r in mine], label=name, **style)
    acc.set_xlabel("cache kept (share of the full cache)")
    acc.set_ylabel("passkey accuracy")
    acc.set_ylim(-0.05, 1.05)
    ppl.set_xlabel("cache kept (share of the full cache)")
    ppl.set_ylabel("perplexity (held-out continuation)")
    acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


def plot_results(results: list[dict], path, title: str) -> None:
    from .report import save_figure

    save_figure(results_figure(results, title), path)
