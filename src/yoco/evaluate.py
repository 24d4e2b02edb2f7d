"""Evaluation of a trained model: validation loss / perplexity, passkey retrieval over context length
x depth (drawn as the usual needle-in-a-haystack heatmap), and multi-query associative recall.

- Passkey: a random 5-digit key is stated inside a haystack of held-out corpus text at a chosen depth
  (0 = the start, 1 = just before the question) and asked for at the end; the greedy continuation
  must reproduce it exactly.
- MQAR: a sequence of key-value token pairs followed by queries of some keys; accuracy is the share
  of queried values the model predicts (teacher-forced argmax at each value position).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .engine import generate
from .models import CausalLM
from .tasks import passkey_key, passkey_prompt


def lm_loss(model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool = False,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: the mean, or the sum weighted by `weights` (same shape as `targets`),
    optionally with bf16 autocast for the forward pass."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    if weights is None:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum()


@torch.no_grad()
def validation_loss(model: CausalLM, shards, batch_size: int, seq_len: int, batches: int | None,
                    bf16: bool = False) -> dict:
    """Loss and perplexity over consecutive held-out rows from the start of the split (`batches` of
    them, None: all), and which slice of the split that is; None for both when the split holds no row
    of seq_len + 1 tokens. Leaves the model in eval mode."""
    model.eval()
    total, tokens, count = 0.0, 0, 0
    for x, y in shards.sequential(batch_size, seq_len, batches):  # weighted by tokens: the last batch may be short
        total += lm_loss(model, x, y, bf16).item() * y.numel()
        tokens += y.numel()
        count += 1
    loss = total / tokens if tokens else None
    split_tokens = len(shards.tokens)
    return {"val_loss": loss, "perplexity": math.exp(loss) if tokens else None, "batches": count, "tokens": tokens,
            "split": shards.split, "split_tokens": split_tokens,
            "whole_split": tokens == max(0, (split_tokens - 1) // seq_len) * seq_len}


def covered(result: dict) -> str:
    """Which slice of the held-out split a ``validation_loss`` result covers, in words."""
    split = "held-out" if result["split"] == "val" else result["split"]
    if result["tokens"] == 0:
        return f"no row: the {result['split_tokens']:,} {split} tokens are fewer than one row"
    if result["whole_split"]:
        return f"the whole {split} split ({result['tokens']:,} of its {result['split_tokens']:,} tokens in whole rows)"
    return f"the first {result['tokens']:,} of the {result['split_tokens']:,} {split} tokens"


# ---------------------------------------------------------------------- passkey
def haystack_for(tokens: Sequence[int], context: int) -> tuple[Sequence[int], int]:
    """Held-out tokens enough for a prompt of ``context`` tokens, and how many times they were repeated
    to get there (1: not at all): a split shorter than a long context is repeated end to end."""
    need = context + 1
    if len(tokens) >= need:
        return tokens, 1
    if not len(tokens):
        return tokens, 1
    times = -(-need // len(tokens))
    return list(tokens) * times, times


# Positions a passkey prompt's answer may take beyond its context (the key's few tokens).
ANSWER_ROOM = 16


@contextmanager
def extrapolating(model: CausalLM, context: int):
    """The model admitting passkey prompts of ``context`` tokens and their answers for the length of a
    ``with``: its ``max_seq_len`` raised if it is shorter (scoring beyond it is extrapolation, not an
    error), and put back after. Yields the limit it had when it was raised, else None."""
    limit = model.config.max_seq_len
    if context + ANSWER_ROOM <= limit:
        yield None
        return
    model.config = model.config.replace(max_seq_len=context + ANSWER_ROOM)
    try:
        yield limit
    finally:
        model.config = model.config.replace(max_seq_len=limit)


def passkey_grid(model: CausalLM, tokenizer, haystack: Sequence[int], contexts: Sequence[int],
                 depths: Sequence[float], trials: int = 3, seed: int = 0, prefill_chunk: int = 1024,
                 compression=None, kv_bits=None, progress: bool = False) -> list[dict]:
    """Accuracy for every (context, depth) cell; each trial uses a different key and haystack offset
    (and, with a ``yoco.compress`` policy, the prompt's cache compressed after prefill; with ``kv_bits``
    the cache quantized). Each cell also records its time, the process's peak resident memory while it
    ran, and how often the haystack was repeated to fill its context (1: not at all). YOCO runs its
    cross-decoder on the question's last token only (the prefill's last chunk asks for one logit), so a
    long prompt costs its self-decoder and the global K/V: O(N)."""
    from tqdm.auto import tqdm

    from .bench import PeakRSS

    rng = random.Random(seed)
    cells = []
    bar = tqdm(total=len(contexts) * len(depths) * trials, desc="passkey", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    for context in contexts:
        tokens, repeated = haystack_for(haystack, context)
        for depth in depths:
            hits = 0
            began = time.perf_counter()
            with PeakRSS() as peak:
                for _ in range(trials):
                    key = passkey_key(rng)
                    start = rng.randrange(0, max(1, len(tokens) - context))
                    prompt = passkey_prompt(tokenizer.encode, tokens[start:], context, depth, key)
                    want = tokenizer.encode(" " + key)
                    out = generate(model, [prompt.ids], max_new_tokens=len(want), prefill_chunk=prefill_chunk,
                                   compression=compression, kv_bits=kv_bits)
                    hits += tokenizer.decode(out.tokens[0]).strip().startswith(key)
                    bar.set_postfix(context=context, depth=depth)
                    bar.update()
            cells.append({"context": context, "depth": depth, "accuracy": hits / trials, "trials": trials,
                          "seconds": time.perf_counter() - began, "peak_rss_bytes": peak.peak,
                          "haystack_repeated": repeated})
    bar.close()
    return cells


def passkey_figure(cells: list[dict], title: str):
    """The needle-in-a-haystack heatmap: accuracy per needle depth (rows) and context length (columns)."""
    from .report import plain_tick_labels, subplots, text_colour_on

    contexts = sorted({c["context"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[next(c["accuracy"] for c in cells if c["context"] == n and c["depth"] == d) for n in contexts]
            for d in depths]
    fig, ax = subplots(figsize=(max(5.0, 1.6 + 0.9 * len(contexts)), 1.6 + 0.5 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(contexts)), [str(n) for n in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7,
                    color=text_colour_on(image.cmap(image.norm(value))))  # both ends of RdYlGn are dark
    fig.colorbar(image, ax=ax, fraction=0.046)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


def plot_passkey(cells: list[dict], path, title: str) -> None:
    from .report import save_figure

    save_figure(passkey_figure(cells, title), path)


# ---------------------------------------------------------------------- MQAR
@torch.no_grad()
def mqar_accuracy(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of masked positions whose token the model predicts from the position before."""
    logits = model(ids)
    predicted = logits[:, :-1].argmax(-1)
    target = ids[:, 1:]
    scored = mask[:, 1:]
    return (predicted[scored] == target[scored]).float().mean().item()


__all__ = ["ANSWER_ROOM", "covered", "extrapolating", "haystack_for", "lm_loss", "mqar_accuracy", "passkey_figure", "passkey_grid", "plot_passkey", "validation_loss"]
