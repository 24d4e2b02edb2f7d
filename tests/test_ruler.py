"""The RULER-style task suite (yoco/ruler.py): prompts of exactly the asked length, the same for a seed,
needles that hold the answers, and an exact scorer."""

from __future__ import annotations

import random
import re

import pytest

from yoco.ruler import RULER_TASKS, score, suite, task_names, task_prompt
from yoco.tasks import TaskError

HAYSTACK_TEXT = "The quick brown fox jumps over the lazy dog. " * 300


def encode(text: str) -> list[int]:  # bytes as ids: decoding is exact
    return list(text.encode())


def decode(ids) -> str:
    return bytes(ids).decode()


HAYSTACK = encode(HAYSTACK_TEXT)


@pytest.mark.parametrize("task", RULER_TASKS)
def test_each_prompt_has_the_asked_length_and_holds_its_answers(task):
    for context in (700, 2000):
        prompt = task_prompt(task, encode, HAYSTACK, context, random.Random(1))
        assert len(prompt.ids) == context and prompt.task == task
        text = decode(prompt.ids)
        assert text.count("The quick brown fox") >= 3  # the haystack is there, the needles inside it
        for answer in prompt.answers:
            assert answer in text
        assert prompt.max_new_tokens >= len(encode(" " + ", ".join(prompt.answers)))


def test_the_answers_are_what_the_needles_say():
    multi_key = task_prompt("multi_key", encode, HAYSTACK, 3000, random.Random(2))
    text = decode(multi_key.ids)
    needles = dict(re.findall(r"magic numbers for (\S+) is: (\d+)\.", text))
    asked = re.search(r"What is the special magic number for (\S+) mentioned", text).group(1)
    assert len(needles) == 4 and multi_key.answers == [needles[asked]]

    multi_query = task_prompt("multi_query", encode, HAYSTACK, 3000, random.Random(3))
    text = decode(multi_query.ids)
    needles = dict(re.findall(r"magic numbers for (\S+) is: (\d+)\.", text))
    asked = re.search(r"What are all the special magic numbers for (.+?) mentioned", text).group(1)
    order = re.split(r", | and ", asked)
    assert multi_query.answers == [needles[k] for k in order] and len(order) == 4

    multi_value = task_prompt("multi_value", encode, HAYSTACK, 3000, random.Random(4))
    found = re.findall(r"magic numbers for (\S+) is: (\d+)\.", decode(multi_value.ids))
    assert len({k for k, _ in found}) == 1 and [v for _, v in found] == multi_value.answers

    tracking = task_prompt("variable_tracking", encode, HAYSTACK, 3000, random.Random(5))
    text = decode(tracking.ids)
    value = re.search(r"VAR [A-Z]{5} = (\d+)\.", text).group(1)
    holds = {value}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", text):  # in the order they appear
        if source in holds:
            holds.add(name)
    assert sorted(holds - {value}) == sorted(tracking.answers) and len(tracking.answers) == 4


def test_the_suite_is_the_same_for_a_seed_and_another_for_another():
    tasks = ("multi_key", "variable_tracking")
    first = suite(tasks, encode, HAYSTACK, 1500, samples=3, seed=7)
    assert [p.ids for p in first] == [p.ids for p in suite(tasks, encode, HAYSTACK, 1500, samples=3, seed=7)]
    assert [p.task for p in first] == ["multi_key"] * 3 + ["variable_tracking"] * 3
    assert [p.ids for p in first] != [p.ids for p in suite(tasks, encode, HAYSTACK, 1500, samples=3, seed=8)]
    # a task's prompts do not depend on which other tasks run
    alone = suite(("variable_tracking",), encode, HAYSTACK, 1500, samples=3, seed=7)
    assert [p.ids for p in alone] == [p.ids for p in first[3:]]


@pytest.mark.parametrize("task", RULER_TASKS)
def test_the_scorer_is_exact(task):
    prompt = task_prompt(task, encode, HAYSTACK, 1500, random.Random(6))
    assert score(prompt, " " + ", ".join(prompt.answers) + ".") == 1.0
    assert score(prompt, " 1234567, 7654321, ABCDE.") == 0.0
    assert score(prompt, " " + prompt.answers[0] + "9") == 0.0  # a whole word, not a prefix
    if len(prompt.answers) == 4:
        assert score(prompt, " " + " and ".join(prompt.answers[:2])) == 0.5


def test_bad_task_names_and_short_contexts_are_refused():
    assert task_names("all") == RULER_TASKS
    assert task_names("multi_key, single_needle,multi_key") == ("multi_key", "single_needle")
    with pytest.raises(TaskError, match="unknown task.*passkey.*choose from single_needle"):
        task_names("single_needle,passkey")
    with pytest.raises(TaskError, match="none given"):
        task_names(" , ")
    with pytest.raises(TaskError, match="context 50 is too short for the multi_value needles"):
        task_prompt("multi_value", encode, HAYSTACK, 50, random.Random(0))
    with pytest.raises(TaskError, match="the haystack has 10 tokens"):
        task_prompt("single_needle", encode, HAYSTACK[:10], 1000, random.Random(0))
