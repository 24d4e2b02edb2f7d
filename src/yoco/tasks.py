"""The synthetic tasks, one definition for training, evaluation and the study: passkey retrieval,
copying and multi-query associative recall (MQAR), as evaluation prompts and as training rows.

- Passkey: a random 5-digit key is stated inside a haystack of corpus text (the needle) and asked
  for later (the question); the answer is the key again. ``passkey_prompt`` ends at the question
  (the model must generate the key), ``passkey_row`` holds the answers too (training scores them).
- Copy: a span of corpus text reappears later in the row (the induction signal passkey retrieval is
  made of).
- MQAR: key-value token pairs, then some keys again, each followed by its value.

``retrieval_rows`` makes the training batches' retrieval rows, the kinds taking turns.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import EOS, SPECIAL_TOKENS
from .errors import YocoError


class TaskError(YocoError, ValueError):
    """A task that cannot be built from what it was given (a context too short for the needle, a
    haystack too small, a bad depth); the message names it."""


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
RETRIEVAL_TASKS = ("passkey", "copy", "mqar")
# The MQAR set `yoco eval` scores by default and `yoco study` scores: sequences, pairs, queried keys.
MQAR_SAMPLES, MQAR_PAIRS, MQAR_QUERIES = 32, 16, 8


# ---------------------------------------------------------------------- passkey
@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    needle_at: int  # token index where the needle starts


def passkey_key(rng: random.Random) -> str:
    """A random 5-digit key."""
    return str(rng.randrange(10000, 100000))


def passkey_parts(encode, key: str) -> tuple[list[int], list[int], list[int]]:
    """The needle, the question and the answer as token ids: one tokenization for the evaluation
    prompts, the training rows (``passkey_row``) and the study's size checks."""
    return encode(" " + NEEDLE.format(key=key) + " "), encode(QUESTION), encode(" " + key)


def passkey_prompt(encode, haystack: Sequence[int], context: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `context` tokens: haystack tokens with the needle inserted at `depth` of the
    filler, then the question."""
    if not 0 <= depth <= 1:
        raise TaskError(f"depth must be within [0, 1], got {depth}")
    needle, question, _ = passkey_parts(encode, key)
    filler = context - len(needle) - len(question)
    if filler < 0:
        raise TaskError(f"context {context} is too short for the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    if len(haystack) < filler:
        raise TaskError(f"the haystack has {len(haystack)} tokens, the prompt needs {filler}")
    at = round(depth * filler)
    ids = [int(t) for t in haystack[:at]] + needle + [int(t) for t in haystack[at:filler]] + question
    return PasskeyPrompt(ids, key, at)


# ---------------------------------------------------------------------- MQAR
def mqar_batch(n: int, pairs: int, queries: int, vocab: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, 2*pairs + 2*queries] and a target mask: keys k_i and values v_i drawn from disjoint
    halves of `vocab`, then `queries` of the keys each followed by its value (the scored positions)."""
    if pairs < queries:
        raise TaskError(f"cannot query {queries} keys out of {pairs} pairs")
    g = torch.Generator().manual_seed(seed)
    vocab = torch.as_tensor(list(vocab))
    half = len(vocab) // 2
    if half < pairs:
        raise TaskError(f"a vocabulary of {len(vocab)} ids cannot hold {pairs} distinct keys")
    rows, masks = [], []
    for _ in range(n):
        keys = vocab[torch.randperm(half, generator=g)[:pairs]]
        values = vocab[half + torch.randint(0, len(vocab) - half, (pairs,), generator=g)]
        asked = torch.randperm(pairs, generator=g)[:queries]
        context = torch.stack([keys, values], dim=1).flatten()
        probe = torch.stack([keys[asked], values[asked]], dim=1).flatten()
        rows.append(torch.cat([context, probe]))
        mask = torch.zeros(len(context) + len(probe), dtype=torch.bool)
        mask[len(context) + 1::2] = True  # the value after each queried key
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


# ---------------------------------------------------------------------- training rows
def passkey_row(encode, haystack, length: int, rng, max_questions: int = 4) -> tuple[list[int], list[int]] | None:
    """A training passkey sequence of exactly `length` tokens, ending with the evaluation prompt's
    question and its answer: corpus text with the needle at a random point and up to `max_questions`
    question + answer pairs after it, the last one at the end. More than one question gives the far
    copy more gradient per row. Returns the row and the positions of its answer tokens (the only
    tokens that need the needle), or None when even one question does not fit, or the haystack is too
    short."""
    needle, question, answer = passkey_parts(encode, passkey_key(rng))
    qa = question + answer
    questions = next((k for k in range(max_questions, 0, -1) if length - len(needle) - k * len(qa) >= 0), 0)
    filler = length - len(needle) - questions * len(qa)
    if questions == 0 or len(haystack) < filler:
        return None
    start = rng.randrange(0, len(haystack) - filler + 1)
    text = [int(t) for t in haystack[start:start + filler]]
    at = rng.randrange(0, filler + 1)
    points = sorted(rng.randrange(at, filler + 1) for _ in range(questions - 1)) + [filler]
    row, previous, answers = text[:at] + needle, at, []
    for point in points:
        row += text[previous:point] + question
        answers += range(len(row), len(row) + len(answer))
        row += answer
        previous = point
    return row, answers


def copy_row(haystack, length: int, rng) -> tuple[list[int], list[int]] | None:
    """A training sequence of exactly `length` corpus tokens in which a span reappears later, at a
    random distance: every token of the repeat after its first is predictable only by finding the
    first occurrence. This is the induction (copy-from-context) signal that passkey retrieval is made
    of. Returns the row and the positions of those predictable tokens, or None when the haystack is
    too short."""
    if length < 8 or len(haystack) < length:
        return None
    span = rng.randrange(4, length // 4 + 1)
    first = rng.randrange(0, length - 2 * span + 1)
    second = rng.randrange(first + span, length - span + 1)
    start = rng.randrange(0, len(haystack) - length + 1)
    text = [int(t) for t in haystack[start:start + length]]
    return text[:second] + text[first:first + span] + text[second + span:], list(range(second + 1, second + span))


def retrieval_rows(n: int, seq_len: int, step: int, seed: int, tokenizer, haystack,
                   tasks: tuple[str, ...] = RETRIEVAL_TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic retrieval sequences of seq_len + 1 tokens, fixed by (seed, step), whose kinds take
    turns through `tasks`: passkey rows (`passkey_row`), copy rows (`copy_row`) and MQAR sequences (also
    standing in for the others when the sequence is too short for them). Returns the rows and a bool
    mask of their retrieval targets: the tokens only the far context can predict (passkey answers, the
    repeat of a copy, MQAR values), which are what training scores these rows on."""
    rng = random.Random(f"{seed}:{step}")
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(EOS)
    rows = torch.full((n, seq_len + 1), eos, dtype=torch.long)
    targets = torch.zeros((n, seq_len + 1), dtype=torch.bool)
    for i in range(n):
        made, task = None, tasks[i % len(tasks)]
        if task == "passkey":
            made = passkey_row(lambda t: tokenizer.encode(t).ids, haystack, seq_len + 1, rng)
        elif task == "copy":
            made = copy_row(haystack, seq_len + 1, rng)
        if made is None:
            pairs = max(1, (seq_len + 1) // 4)
            ids, mask = mqar_batch(1, pairs, pairs, range(len(SPECIAL_TOKENS), vocab), seed=rng.randrange(1 << 30))
            made = ids[0, : seq_len + 1].tolist(), mask[0, : seq_len + 1].nonzero().flatten().tolist()
        row, answers = made
        rows[i, :len(row)] = torch.tensor(row)
        targets[i, answers] = True
    return rows, targets


__all__ = ["MQAR_PAIRS", "MQAR_QUERIES", "MQAR_SAMPLES", "NEEDLE", "PasskeyPrompt", "QUESTION", "RETRIEVAL_TASKS",
           "copy_row", "mqar_batch", "passkey_key", "passkey_parts", "passkey_prompt", "passkey_row", "retrieval_rows"]
