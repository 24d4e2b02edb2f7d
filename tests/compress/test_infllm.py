"""InfLLM's context memory: with every block retrieved it is full attention (true positions) or attention
with distances capped at n_local (the paper's shared position); the resident set stays within its bound
and the bytes are exact; retrieval finds the matching block; left-padded batches equal each row alone;
on yoco's models and on transformers Llama/Qwen2; bad settings are refused."""

import pytest
import torch
from harness import hf_model, make_model, run

from yoco.compress import BudgetError, InfLLM, InfLLMKV, make_policy, policy_for_context
from yoco.engine import decode_step, generate, left_pad, prefill
from yoco.hf_runner import TransformersLM
from yoco.layers import RotaryEmbedding, Step, rotate_by

VARIANTS = ["transformer", "transformer-mqa", "cla2", "mla", "yoco-swa", "yoco-gret"]
SMALL = dict(n_init=4, n_local=16, block_size=8)


def stores(cache):
    layers = [getattr(c, "store", c) for c in cache.layers]
    return [s for s in layers if isinstance(s, InfLLMKV)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_true_positions_with_every_block_retrieved_equal_full_attention(variant):
    model = make_model(variant)
    prompts = [torch.randint(1, 200, (n,)).tolist() for n in (70, 45)]
    reference, _ = run(model, prompts, None, steps=20)
    policy = InfLLM(**SMALL, topk=64, max_cached_blocks=64, positions="true")
    out, cache = run(model, prompts, policy, steps=20)
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-5)
    for store in stores(cache):  # the memory really moved: most tokens sit in offloaded units
        assert store.n_units.tolist() == [(90 - 1 + 1 - 16 - 4) // 8, (65 - 16 - 4) // 8]
        assert store.offloaded_bytes() > 0 and store.entries < 40


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_true_positions_on_transformers_models_equal_their_own_cache(kind):
    lm = TransformersLM(hf_model(kind))
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (60, 37)]
    reference = run_hf(lm, prompts, None)
    out = run_hf(lm, prompts, InfLLM(**SMALL, topk=64, max_cached_blocks=64, positions="true"))
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-5)


def run_hf(lm, prompts, policy):
    """``run`` on a transformers model, checking that InfLLM did form memory units."""
    logits, cache = run(lm, prompts, policy, steps=12)
    if policy is not None:
        assert all(int(s.n_units.min()) > 0 for s in stores(cache))
    return logits


def store_and_rotary(policy, d=8):
    rotary = RotaryEmbedding(d)
    store = InfLLMKV(policy, layer=0, n_layers=1, batch_size=1, n_kv_heads=1, key_dim=d, value_dim=d,
                     dtype=torch.float32, rotate=lambda x, delta: rotate_by(rotary, x, delta))
    return store, rotary


def feed(store, rotary, q, k, v, calls):
    """Raw (unrotated) q [1, H, N, d], k, v [1, 1, N, d] through the store in calls of the given sizes."""
    outs, start = [], 0
    for n in calls:
        pos = torch.arange(start, start + n)[None]
        store.append(rotate_by(rotary, k[:, :, start:start + n], pos), v[:, :, start:start + n])
        outs.append(store.attend(rotate_by(rotary, q[:, :, start:start + n], pos), Step(start, n, None, q.device)))
        start += n
    return torch.cat(outs, dim=2)


def test_shared_positions_equal_attention_with_distances_capped_at_n_local():
    torch.manual_seed(0)
    policy = InfLLM(n_init=2, n_local=6, block_size=3, topk=50, max_cached_blocks=50, exc_block_size=4)
    store, rotary = store_and_rotary(policy)
    N, H, d = 34, 2, 8
    q, k, v = torch.randn(1, H, N, d), torch.randn(1, 1, N, d), torch.randn(1, 1, N, d)
    out = feed(store, rotary, q, k, v, [4] * 5 + [1] * 14)
    assert int(store.n_units[0]) == (N - 6 - 2) // 3  # the memory was used
    expected = torch.zeros(1, H, N, d)
    for t in range(N):
        distance = (t - torch.arange(t + 1)).clamp_max(policy.n_local)  # shared position beyond the window
        rotated = rotate_by(rotary, q[:, :, t:t + 1].expand(1, H, t + 1, d), distance[None])  # [1, H, t+1, d]
        logits = (rotated * k[:, :, :t + 1]).sum(-1) * d ** -0.5
        expected[:, :, t] = logits.softmax(-1) @ v[0, 0, :t + 1]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_retrieval_finds_the_block_that_matches_the_query():
    torch.manual_seed(0)
    policy = InfLLM(n_init=2, n_local=8, block_size=4, topk=1, max_cached_blocks=2, repr_topk=4)
    store, rotary = store_and_rotary(policy)
    N, d = 41, 8
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    q = u.expand(1, 1, N, d).clone()
    k, v = 0.05 * torch.randn(1, 1, N, d), torch.randn(1, 1, N, d)
    k[0, 0, 12] = 5 * rotate_by(rotary, u.view(1, 1, 1, d), torch.tensor([policy.n_local]))[0, 0, 0]
    feed(store, rotary, q, k, v, [8] * 5 + [1])
    latest = store.resident_used[0].argmax()
    assert int(store.resident_id[0, latest]) == (12 - 2) // 4  # the block holding the planted key


@pytest.mark.parametrize("variant", ["transformer", "mla", "yoco-swa"])
def test_resident_set_never_exceeds_its_bound_and_bytes_are_exact(variant):
    model = make_model(variant)
    policy = InfLLM(**SMALL, topk=2, max_cached_blocks=3)
    ids, _ = left_pad([torch.randint(1, 200, (60,)).tolist()])
    cache = model.new_cache(1, compression=policy)
    logits = prefill(model, ids, cache, 64)  # the engine sends exc_block_size calls
    for step in range(80):
        for store in stores(cache):
            bs, per_token = 8, store.k[0, :, 0].numel() * store.k.element_size() * (1 if store.v is None else 2)
            units = int(store.n_units[0])
            # blocks out of the window of the latest token (after the prompt) or of the one before it (a
            # decode step packs them before writing its token, which still attends them)
            assert units == (store.seen - (step > 0) - 16 - 4) // bs
            assert store.entries == store.seen - units * bs  # initial + local + not yet a block
            assert store.resident_k.shape[2] <= 3
            assert store.nbytes() == (store.entries + store.resident_k.shape[2] * bs) * per_token
            assert store.offloaded_bytes() == units * bs * per_token
        logits = decode_step(model, logits.argmax(-1), cache)
    assert all(s.loads > 3 for s in stores(cache))  # units were evicted and loaded again (LRU at work)
    assert cache.offloaded_bytes() == sum(s.offloaded_bytes() for s in stores(cache))


@pytest.mark.parametrize("variant", ["transformer", "mla", "yoco-swa"])
def test_left_padded_batch_equals_each_prompt_alone(variant):
    model = make_model(variant)
    prompts = [torch.randint(1, 200, (n,)).tolist() for n in (70, 45)]
    policy = InfLLM(**SMALL, topk=2, max_cached_blocks=3)
    batch, _ = run(model, prompts, policy, steps=16)
    for row, prompt in enumerate(prompts):
        alone, _ = run(model, [prompt], policy, steps=16)
        torch.testing.assert_close(batch[:, row], alone[:, 0], rtol=0, atol=2e-5)


def test_left_padded_batch_equals_each_prompt_alone_on_llama():
    lm = TransformersLM(hf_model("llama"))
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (60, 37)]
    policy = InfLLM(**SMALL, topk=2, max_cached_blocks=3)
    batch = run_hf(lm, prompts, policy)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(batch[:, row], run_hf(lm, [prompt], policy)[:, 0], rtol=0, atol=2e-5)


def test_budget_sets_the_window_in_the_papers_proportions():
    paper = InfLLM()
    assert (paper.n_init, paper.n_local, paper.block_size, paper.topk, paper.exc_block_size,
            paper.max_cached_blocks) == (128, 4096, 128, 16, 512, 32)
    same = InfLLM(6272)
    assert (same.n_init, same.n_local, same.block_size, same.topk) == (128, 4096, 128, 16)
    small = InfLLM(240)
    assert small.attention_window == 240 and small.block_size == 8 and small.n_local >= small.exc_block_size
    assert policy_for_context("infllm", 0.25, 960).attention_window == 240
    assert make_policy("infllm", 300, n_init=4, block_size=16, topk=4).n_local == 300 - 4 - 64
    spec = policy_for_context("infllm:positions=true:topk=4:block-size=16", 300, 960)
    assert (spec.positions, spec.topk, spec.block_size, spec.attention_window) == ("true", 4, 16, 300)


@pytest.mark.parametrize("options, message", [
    (dict(budget=0.25), "token count"),
    (dict(budget=40, n_init=4, block_size=8, topk=8), "no local window"),
    (dict(n_local=8, exc_block_size=16), "exc_block_size"),
    (dict(topk=8, max_cached_blocks=4), "max_cached_blocks"),
    (dict(block_size=4, repr_topk=5), "repr_topk"),
    (dict(positions="relative"), "positions"),
    (dict(budget=100, n_init=4, n_local=10, block_size=8, topk=2), "!="),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(BudgetError, match=message):
        InfLLM(**options)


def test_a_sliding_window_model_and_a_missing_rope_are_refused():
    policy = InfLLM(**SMALL, topk=2)
    with pytest.raises(BudgetError, match="needs the model's RoPE"):
        InfLLMKV(policy, layer=0, n_layers=1, batch_size=1, n_kv_heads=1, key_dim=8, value_dim=8, dtype=torch.float32)
    lm = TransformersLM(hf_model("mistral", sliding_window=24))
    with pytest.raises(BudgetError, match="sliding-window"):
        run_hf(lm, [list(range(1, 40))], policy)


def test_generate_keeps_the_working_set_bounded():
    model = make_model("transformer")
    policy = InfLLM(**SMALL, topk=2, max_cached_blocks=3)
    out = generate(model, torch.randint(1, 200, (2, 50)), 70, compression=policy)
    per_token = model.cache_bytes_formula(2, 1, torch.float32)  # one token of every layer's K/V, both rows
    bound = (4 + 16 + 8 + 3 * 8) * per_token  # initial + local + a partial block + the resident units
    assert out.stats["compressed_prompt_bytes"] <= bound and out.cache_bytes <= bound
    assert out.cache_bytes < model.cache_bytes_formula(2, 120, torch.float32) / 2
