"""Sampling, stopping, streaming and the engine's errors on bad input."""

import pytest
import torch
from harness import make_model

from yoco import InputError, generate, stream
from yoco.engine import PrefillCall, SamplingParams, plan_prefill, sample


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1), g), logits.argmax(-1))


def test_top_k_only_samples_from_the_k_best():
    logits = torch.randn(2, 30)
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens = sample(logits, SamplingParams(temperature=2.0, top_k=5), g)
        assert all(int(t) in allowed[row].tolist() for row, t in enumerate(tokens))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1}; top_p=0.5 keeps {0} only.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(50)}
    assert seen == {0}


def test_seeded_sampling_repeats_and_seeds_differ():
    model = make_model("yoco-swa")
    prompt = [[5, 6, 7, 8]]
    a = generate(model, prompt, 20, temperature=1.0, seed=7).tokens
    b = generate(model, prompt, 20, temperature=1.0, seed=7).tokens
    c = generate(model, prompt, 20, temperature=1.0, seed=8).tokens
    assert a == b and a != c


def test_stop_token_ends_a_row_and_the_batch():
    model = make_model("transformer")
    free = generate(model, [[1, 2, 3], [9, 9]], 12).tokens
    stop = free[0][4]
    result = generate(model, [[1, 2, 3], [9, 9]], 12, stop_tokens=[stop])
    first = free[0].index(stop)
    assert result.tokens[0] == free[0][: first + 1] and result.finish_reasons[0] == "stop"
    if stop in free[1]:
        assert result.tokens[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert result.tokens[1] == free[1] and result.finish_reasons[1] == "length"


def test_stream_yields_the_generated_tokens():
    model = make_model("yoco-gret")
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    generation = stream(model, prompts, 10)
    steps = list(generation)
    assert len(steps) == 10
    assert [[s[row] for s in steps] for row in range(2)] == generation.result().tokens
    assert generation.result().tokens == generate(model, prompts, 10).tokens


def test_generation_reports_the_cache_it_used():
    model = make_model("yoco-swa")
    result = generate(model, [[1] * 30], 10)
    assert result.cache_bytes == model.cache_bytes_formula(1, 40, torch.float32)
    assert len(result.tokens[0]) == 10 and result.prefill_s > 0


@pytest.mark.parametrize("prompts,message", [
    ([[]], "prompt 0 is empty"),
    ([], "no prompts"),
    (torch.tensor([[0.5, 1.0]]), "must be integers"),
    ([[1, "a"]], "integer token ids"),
    ([[1] * 1025], "longer than the model's maximum"),
    ([[1] * 1000], "exceeds the model's max_seq_len"),
    ([[1, 300]], "outside the vocabulary"),
])
def test_bad_prompts_raise_clear_errors(prompts, message):
    model = make_model("yoco-swa")
    with pytest.raises(InputError, match=message):
        generate(model, prompts, 32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(prefill_chunk=0), "prefill chunk"),
])
def test_bad_sampling_options_raise(kwargs, message):
    with pytest.raises(InputError, match=message):
        generate(make_model("transformer"), [[1, 2, 3]], 4, **kwargs)


def test_bad_model_calls_raise():
    model = make_model("yoco-gret")
    with pytest.raises(InputError, match="integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(InputError, match=r"shape \[batch, length\]"):
        model(torch.ones(4, dtype=torch.long))
    with pytest.raises(InputError, match="empty input"):
        model(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="longer than the model's maximum"):
        model(torch.ones(1, 1025, dtype=torch.long))
    cache = model.new_cache(2, capacity=8)
    with pytest.raises(InputError, match="batch size 2"):
        model(torch.ones(1, 3, dtype=torch.long), cache)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model, [[1]], 0)


def test_a_prefill_plan_asks_its_last_chunk_for_the_logits():
    # without a tail the last chunk gives the first token: no extra call (a server iteration) for it
    assert plan_prefill(16384, 8192) == [PrefillCall(0, 8192, 0), PrefillCall(8192, 16384, 1)]
    assert plan_prefill(9, 4) == [PrefillCall(0, 4, 0), PrefillCall(4, 8, 0), PrefillCall(8, 9, 1)]
    assert plan_prefill(3, 8) == [PrefillCall(0, 3, 1)]
    assert plan_prefill(0, 8) == [PrefillCall(0, 0, 0)]
    # a policy's tail of scored queries goes in a call of its own
    assert plan_prefill(10, 4, tail=3) == [PrefillCall(0, 4, 0), PrefillCall(4, 7, 0), PrefillCall(7, 10, 3)]
    assert plan_prefill(2, 4, tail=5) == [PrefillCall(0, 2, 2)]
