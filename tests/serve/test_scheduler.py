"""The scheduler without HTTP: staggered arrivals decode exactly as each prompt alone, the budget is
held, finished and cancelled sequences free their caches, and the text stream's stop rules."""

import time

import pytest
import torch
from harness import POLICIES, make_model

from yoco.engine import SamplingParams, generate
from yoco.serve.scheduler import Overloaded, Request, RequestError, Scheduler, TextStream
from yoco.tokenizer import ByteTokenizer

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], list(range(10, 40)), [4, 4], list(range(50, 63)), [7] * 21]


def run_staggered(model, arrivals: dict[int, list[tuple[list[int], int, SamplingParams]]], compression=None,
                  chunk: int = 5, **options):
    """Submit each request at its iteration; run until all end; each request's tokens and finish."""
    events = {}
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=options.pop("kv_budget", 1 << 30), prefill_chunk=chunk,
                          compression=compression, **options)
    submitted = []
    with torch.inference_mode():
        for iteration in range(2000):
            for prompt, n, sampling in arrivals.get(iteration, []):
                key = len(submitted)
                events[key] = []
                submitted.append(scheduler.submit(Request(prompt, n, sampling, emit=events[key].append)))
            if not scheduler.step() and iteration > max(arrivals):
                break
    assert scheduler.live_bytes() == 0 and scheduler.reserved == 0
    return [[e.token for e in events[k] if e.token is not None] for k in range(len(submitted))], \
        [events[k][-1].finish_reason for k in range(len(submitted))], scheduler


@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "yoco-gret", "mla", "cla2", "block"])
def test_staggered_arrivals_decode_as_each_prompt_alone(variant):
    model = make_model(variant).eval()
    lengths = [24, 14, 30, 16, 20]
    arrivals = {0: [(PROMPTS[0], lengths[0], SamplingParams())], 3: [(PROMPTS[1], lengths[1], SamplingParams())],
                4: [(PROMPTS[2], lengths[2], SamplingParams())], 11: [(PROMPTS[3], lengths[3], SamplingParams())],
                12: [(PROMPTS[4], lengths[4], SamplingParams())]}
    tokens, finishes, scheduler = run_staggered(model, arrivals)
    for prompt, n, got in zip(PROMPTS, lengths, tokens):
        assert got == generate(model, [prompt], n).tokens[0]
    assert finishes == ["length"] * 5
    assert scheduler.metrics.max_running >= 3  # they did run together


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_compressed_sequences_decode_as_alone(policy):
    model = make_model("yoco-swa").eval()
    make = POLICIES[policy]
    arrivals = {0: [(PROMPTS[1], 6, SamplingParams())], 2: [(PROMPTS[4], 7, SamplingParams())],
                5: [(PROMPTS[3], 5, SamplingParams())]}
    tokens, _, _ = run_staggered(model, arrivals, compression=make(8))
    for (prompt, n, _), got in zip([a[0] for a in arrivals.values()], tokens):
        assert got == generate(model, [prompt], n, compression=make(8)).tokens[0]


@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "mla"])
def test_quantized_sequences_decode_as_alone_and_reserve_their_quantized_bytes(variant):
    from yoco.quantize import KVQuantization

    model = make_model(variant).eval()
    kv = KVQuantization(4, group=8, residual=4)  # the prompts fold into codes while they are prefilled
    arrivals = {0: [(PROMPTS[1], 12, SamplingParams())], 2: [(PROMPTS[4], 9, SamplingParams())],
                5: [(PROMPTS[3], 10, SamplingParams())]}
    tokens, _, scheduler = run_staggered(model, arrivals, kv_bits=kv)
    for (prompt, n, _), got in zip([a[0] for a in arrivals.values()], tokens):
        # (the same prefill chunks: a call's own entries are attended in full precision)
        assert got == generate(model, [prompt], n, kv_bits=kv, prefill_chunk=5).tokens[0]
    assert scheduler.reservation(100) == model.cache_bytes_formula(1, 100, torch.float32, kv_bits=kv)
    assert scheduler.reservation(100) < model.cache_bytes_formula(1, 100, torch.float32)


def test_compressed_then_quantized_sequences_decode_as_alone():
    from yoco.quantize import KVQuantization

    model = make_model("yoco-swa").eval()
    kv, snap = KVQuantization(4, group=8, residual=4), POLICIES["snapkv"]
    arrivals = {0: [(PROMPTS[1], 8, SamplingParams())], 2: [(PROMPTS[4], 6, SamplingParams())]}
    tokens, _, scheduler = run_staggered(model, arrivals, compression=snap(8), kv_bits=kv)
    for (prompt, n, _), got in zip([a[0] for a in arrivals.values()], tokens):
        assert got == generate(model, [prompt], n, compression=snap(8), kv_bits=kv, prefill_chunk=5).tokens[0]
    # the prompt is held in full precision until it is compressed: that is what a sequence reserves
    assert scheduler.reservation(100) == model.cache_bytes_formula(1, 100, torch.float32)


def test_seeded_sampling_is_reproducible_and_equals_generate():
    model = make_model("yoco-swa").eval()
    sampling = SamplingParams(temperature=1.0, top_k=50, seed=7)
    arrivals = {0: [(PROMPTS[0], 10, sampling)], 1: [(PROMPTS[1], 10, SamplingParams(temperature=1.0, seed=8))],
                4: [(PROMPTS[0], 10, sampling)]}
    tokens, _, _ = run_staggered(model, arrivals)
    assert tokens[0] == tokens[2]
    assert tokens[0] == generate(model, [PROMPTS[0]], 10, temperature=1.0, top_k=50, seed=7).tokens[0]
    assert tokens[0] != generate(model, [PROMPTS[0]], 10).tokens[0]  # it did sample


def test_budget_runs_k_at_a_time_and_all_complete():
    model = make_model("transformer").eval()
    n = 20  # decoding outlasts the next prompt's prefill, so k run at once
    per_sequence = model.cache_bytes_formula(1, len(PROMPTS[1]) + n, torch.float32)
    k = 2
    arrivals = {0: [(PROMPTS[1], n, SamplingParams())] * (k + 3)}
    tokens, finishes, scheduler = run_staggered(model, arrivals, kv_budget=k * per_sequence)
    assert finishes == ["length"] * (k + 3)
    assert scheduler.metrics.max_running == k
    assert scheduler.metrics.max_cache_bytes == k * per_sequence  # exactly what was reserved, never more
    alone = generate(model, [PROMPTS[1]], n).tokens[0]
    assert all(t == alone for t in tokens)


def test_requests_that_can_never_run_are_refused():
    model = make_model("transformer").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=model.cache_bytes_formula(1, 40, torch.float32),
                          max_waiting=1)
    limit = model.config.max_seq_len
    with pytest.raises(RequestError, match="max_seq_len"):
        scheduler.submit(Request([1] * (limit + 1), 1))
    with pytest.raises(RequestError, match="plus max_tokens"):
        scheduler.submit(Request([1] * 10, limit))
    with pytest.raises(RequestError, match=r"needs .* of KV cache \(prompt 30 \+ max_tokens 11 positions\)"):
        scheduler.submit(Request([1] * 30, 11))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        scheduler.submit(Request([1, 256], 1))
    with pytest.raises(RequestError, match="empty"):
        scheduler.submit(Request([], 1))
    scheduler.submit(Request([1] * 30, 10))
    with pytest.raises(Overloaded, match="waiting"):
        scheduler.submit(Request([1] * 30, 10))
    with pytest.raises(RequestError, match="kv budget must be positive"):
        Scheduler(model, ByteTokenizer(256), kv_budget=0)


def test_cancelled_sequence_frees_its_cache_at_the_next_step():
    model = make_model("yoco-swa").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=1 << 30, prefill_chunk=4)
    events = []
    with torch.inference_mode():
        sequence = scheduler.submit(Request(PROMPTS[1], 500, emit=events.append))
        other = scheduler.submit(Request(PROMPTS[0], 8))
        for _ in range(20):
            scheduler.step()
        assert scheduler.live_bytes() > 0 and len(events) > 0
        scheduler.cancel(sequence)
        scheduler.step()
        assert sequence.cache is None and sequence not in scheduler.running
        assert scheduler.metrics.finished["cancelled"] == 1
        while scheduler.step():
            pass
    assert other.cache is None and scheduler.live_bytes() == 0 and scheduler.reserved == 0
    assert len(events) < 30


def test_run_drives_the_sequences_on_this_thread_until_told_and_stop_ends_it():
    model = make_model("yoco-swa").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=1 << 30, prefill_chunk=4)
    ends = []
    scheduler.submit(Request(PROMPTS[1], 6, emit=lambda e: e.finish_reason and ends.append(e)))
    deadline = time.monotonic() + 60
    scheduler.run(until=lambda: bool(ends) or time.monotonic() > deadline)
    assert [e.finish_reason for e in ends] == ["length"] and scheduler.live_bytes() == 0
    assert scheduler.metrics.generation_tokens == 6
    scheduler.stop()
    scheduler.run()  # stopped: returns at once instead of waiting for work


def test_text_stream_cuts_at_stop_strings_across_tokens_and_holds_partial_characters():
    tokens = list("hello wor".encode()) + list("ld!".encode())
    stream = TextStream(ByteTokenizer(256), ("world",))
    out, stopped = "", False
    for t in tokens:
        delta, stopped = stream.push(t)
        out += delta
        if stopped:
            break
    assert (out, stopped) == ("hello ", True)
    stream = TextStream(ByteTokenizer(256), ())
    euro = list("€".encode())  # three bytes: nothing is sent until the character is whole
    assert [stream.push(b)[0] for b in euro] == ["", "", "€"]
    stream = TextStream(ByteTokenizer(256), ("xyz",))
    assert [stream.push(b)[0] for b in b"abxy"] == ["", "", "a", "b"]  # "xy" could start the stop string
    assert stream.rest() == "xy"
