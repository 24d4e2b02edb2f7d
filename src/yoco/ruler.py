"""A fixed multi-task retrieval suite in the style of RULER (arXiv 2404.06654), the protocol kvpress ranks
its presses on: each prompt hides needles in a haystack of held-out text and ends with a question whose
answers are words of the needles. Generated deterministically from a seed and the haystack, so every
policy, ratio and library (yoco and the kvpress peer) is scored on the same prompts.

- ``single_needle``: one key's magic number is stated once; asked for it (passkey retrieval's shape).
- ``multi_key``: four keys' numbers are stated; asked for one of them (the others distract).
- ``multi_value``: one key is given four numbers at four places; asked for all of them.
- ``multi_query``: four keys' numbers are stated; asked for all four, in the order asked.
- ``variable_tracking``: a chain of assignments (``VAR QXZKT = 48211.``, ``VAR BMWRA = QXZKT.``, ...)
  spread through the text; asked for every variable that holds the value.

Scoring is exact: an answer counts when it appears as a whole word of the generated text (RULER's
``string_match_all``: a prompt scores the fraction of its answers found), so a model that says the
right answers scores 100% and one that says others 0%.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .tasks import TaskError

RULER_TASKS = ("single_needle", "multi_key", "multi_value", "multi_query", "variable_tracking")
NEEDLES = 4  # keys (multi-key, multi-query), values (multi-value), assignments (variable tracking)
# The keys: an adjective and a noun, as RULER's word keys
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind",
              "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid",
              "wild", "young")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tunnel",
         "violin", "wagon", "yarrow", "zebra")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ASSIGN_VALUE = "VAR {name} = {value}."
ASSIGN_NAME = "VAR {name} = {source}."


@dataclass
class TaskPrompt:
    task: str
    ids: list[int]
    answers: list[str]  # every one is expected in the generated text
    max_new_tokens: int  # room for the answers as the model would write them


def task_names(text: str) -> tuple[str, ...]:
    """The tasks a ``--tasks`` value names (comma separated, ``all``), or a TaskError naming the unknown."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return RULER_TASKS
    unknown = [n for n in names if n not in RULER_TASKS]
    if unknown or not names:
        raise TaskError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(RULER_TASKS)} or all")
    return tuple(dict.fromkeys(names))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _words(task: str, rng: random.Random) -> tuple[list[str], str, list[str]]:
    """The task's needle sentences (in the order they appear), its question and its answers."""
    if task == "variable_tracking":
        value = str(rng.randrange(10_000, 100_000))
        names = []
        while len(names) < NEEDLES:
            name = _variable(rng)
            if name not in names:
                names.append(name)
        needles = [ASSIGN_VALUE.format(name=names[0], value=value)]
        needles += [ASSIGN_NAME.format(name=names[i], source=names[i - 1]) for i in range(1, NEEDLES)]
        question = (f" Question: Find all variables that are assigned the value {value} in the text above."
                    " Answer: According to the chain(s) of variable assignment in the text above, the variables"
                    f" assigned the value {value} are:")
        return needles, question, names
    if task == "multi_value":
        key = _keys(rng, 1)[0]
        values = [_number(rng) for _ in range(NEEDLES)]
        needles = [NEEDLE.format(key=key, value=v) for v in values]
        question = (f" What are all the special magic numbers for {key} mentioned in the text? "
                    f"The special magic numbers for {key} mentioned in the text are:")
        return needles, question, values
    keys = _keys(rng, 1 if task == "single_needle" else NEEDLES)
    values = [_number(rng) for _ in keys]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    if task == "multi_query":
        order = rng.sample(range(len(keys)), len(keys))
        asked = ", ".join(keys[i] for i in order[:-1]) + f" and {keys[order[-1]]}"
        question = (f" What are all the special magic numbers for {asked} mentioned in the text? "
                    f"The special magic numbers for {asked} mentioned in the text are:")
        return needles, question, [values[i] for i in order]
    i = rng.randrange(len(keys))  # single_needle: the only one
    question = (f" What is the special magic number for {keys[i]} mentioned in the text? "
                f"The special magic number for {keys[i]} mentioned in the text is:")
    return needles, question, [values[i]]


def task_prompt(task: str, encode: Callable[[str], list[int]], haystack: Sequence[int], context: int,
                rng: random.Random) -> TaskPrompt:
    """One prompt of exactly ``context`` tokens: haystack tokens with the task's needles inserted, in
    order, at token positions drawn from ``rng`` (as the passkey's is), then the question."""
    if task not in RULER_TASKS:
        raise TaskError(f"unknown task {task!r}; choose from {', '.join(RULER_TASKS)}")
    needles, question, answers = _words(task, rng)
    needle_ids = [encode(" " + n + " ") for n in needles]
    question_ids = encode(question)
    filler = context - sum(map(len, needle_ids)) - len(question_ids)
    if filler < 0:
        raise TaskError(f"context {context} is too short for the {task} needles and question "
                        f"({context - filler} tokens)")
    if len(haystack) < filler:
        raise TaskError(f"the haystack has {len(haystack)} tokens, the {task} prompt needs {filler}")
    cuts = sorted(rng.randrange(filler + 1) for _ in needle_ids)
    ids, at = [], 0
    for cut, needle in zip(cuts, needle_ids):
        ids += [int(t) for t in haystack[at:cut]] + needle
        at = cut
    ids += [int(t) for t in haystack[at:filler]] + question_ids
    answer_ids = len(encode(" " + ", ".join(answers) + "."))
    return TaskPrompt(task, ids, answers, answer_ids + 4)


def score(prompt: TaskPrompt, generated: str) -> float:
    """The fraction of the prompt's answers that appear as whole words in the generated text."""
    words = set(re.findall(r"[A-Za-z0-9]+", generated))
    return sum(a in words for a in prompt.answers) / len(prompt.answers)


def task_scores(prompts: Sequence[TaskPrompt], answers: Sequence[str]) -> dict[str, float]:
    """Each task's mean ``score`` over its prompts, given the text generated for each prompt."""
    scores: dict[str, list[float]] = {}
    for prompt, generated in zip(prompts, answers, strict=True):
        scores.setdefault(prompt.task, []).append(score(prompt, generated))
    return {task: sum(s) / len(s) for task, s in scores.items()}


def suite(tasks: Sequence[str], encode, haystack: Sequence[int], context: int, samples: int,
          seed: int = 0) -> list[TaskPrompt]:
    """``samples`` prompts of each task, the same for a given seed, haystack and context whatever else
    runs: each task draws from its own generator, seeded by the seed and the task's name, and each
    prompt starts at its own offset of the haystack."""
    prompts = []
    for task in tasks:
        rng = random.Random(f"{seed}:{task}")
        for _ in range(samples):
            start = rng.randrange(0, max(1, len(haystack) - context))
            prompts.append(task_prompt(task, encode, haystack[start:], context, rng))
    return prompts
