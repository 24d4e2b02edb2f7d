"""Compression on randomly initialised transformers Llama, Mistral and Qwen2 models, through the public
Cache and AttentionInterface APIs, driven by yoco's engine and by transformers' own generate(); with a
sliding window, never more bytes than transformers' own cache (plus the current token while decoding)."""

import pytest
import torch
from harness import POLICIES, hf_model, left_padded, make_model, run

from yoco.cache import tensor_bytes
from yoco.compress import CORM, H2O, TOVA, AdaKV, BudgetError, CompressedKV, InfLLM, PyramidKV, SnapKV, StreamingLLM
from yoco.compress.hf import CompressedCache
from yoco.compress.hf import generate as hf_generate
from yoco.engine import decode_step, generate, left_pad, prefill
from yoco.hf_runner import TransformersLM
from yoco.models.base import InputError


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_budget_above_the_prompt_changes_nothing(kind, name):
    lm = TransformersLM(hf_model(kind))
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (50, 31)]
    reference, _ = run(lm, prompts, None, steps=8)  # transformers' own DynamicCache and SDPA with a padding mask
    compressed, cache = run(lm, prompts, POLICIES[name](1000), steps=8)
    assert isinstance(cache, CompressedCache)
    torch.testing.assert_close(compressed, reference, rtol=0, atol=2e-5)


def test_the_model_alone_gives_the_engines_logits():
    model = hf_model()
    ids = torch.randint(1, 300, (1, 30))
    logits, _ = run(TransformersLM(model), [ids[0].tolist()], None, steps=0)
    torch.testing.assert_close(logits[0], model(ids).logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_left_padded_batch_equals_each_prompt_alone(kind, name):
    lm = TransformersLM(hf_model(kind))
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (70, 45)]
    policy = POLICIES[name](0.3) if name != "corm" else CORM(window=8)
    out = generate(lm, prompts, 16, compression=policy)
    assert out.tokens == [generate(lm, [p], 16, compression=policy).tokens[0] for p in prompts]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_streamingllm_positions_equal_running_the_kept_tokens_afresh(kind):
    model = hf_model(kind, layers=1)
    lm = TransformersLM(model)
    ids = torch.randint(1, 300, (1, 40))
    cache = lm.new_cache(1, compression=StreamingLLM(12))
    logits, tokens = prefill(lm, ids, cache, 16), ids[0].tolist()
    for _ in range(8):
        tokens.append(int(logits.argmax(-1)))
        logits = decode_step(lm, torch.tensor(tokens[-1:]), cache)
        kept = tokens[:4] + tokens[-8:]
        torch.testing.assert_close(logits, model(torch.tensor([kept])).logits[:, -1], rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 48  # the true count of tokens seen, never the 12 kept


def test_bytes_per_layer_follow_the_budget_and_the_pyramid():
    model = hf_model(layers=4)
    lm = TransformersLM(model)
    ids = torch.randint(1, 300, (1, 200))
    per_token = 2 * 2 * 16 * 4  # K and V, 2 heads of 16, fp32
    cache = lm.new_cache(1, compression=SnapKV(40))
    prefill(lm, ids, cache, 64)
    assert [layer.store.nbytes() for layer in cache.layers] == [40 * per_token] * 4
    pyramid = PyramidKV(60, window=8, beta=4)
    cache = lm.new_cache(1, compression=pyramid)
    logits = prefill(lm, ids, cache, 64)
    expected = [int(pyramid.limit(torch.tensor([200]), i, 4)[0]) for i in range(4)]
    assert expected[0] > expected[-1]
    assert [layer.store.nbytes() for layer in cache.layers] == [n * per_token for n in expected]
    # unequal per-layer lengths decode fine: each layer's mask comes from its own entries
    decode_step(lm, logits.argmax(-1), cache)


def test_mistral_sliding_window_is_honoured():
    lm = TransformersLM(hf_model("mistral", sliding_window=16))
    prompts = [torch.randint(1, 300, (40,)).tolist()]
    reference, _ = run(lm, prompts, None, steps=8)
    compressed, _ = run(lm, prompts, SnapKV(1000), steps=8)
    torch.testing.assert_close(compressed, reference, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------- sliding windows: bytes
WINDOW = 16
ONE_TOKEN = 2 * 2 * 16 * 4  # one token of one layer for one row: K and V, 2 heads of 16, fp32


def teacher_forced(lm, prompts, policy, steps=8, chunk=12):
    """transformers' own cache and a compressed one fed the same tokens: the prompt in calls of
    ``chunk`` (then ``compress()``), then ``steps`` decode steps of the reference's greedy tokens.
    (12: with prompts of 40 and 29 tokens every call ends on a real token of both rows; a call of
    padding only would give logits that mean nothing.)
    Yields (phase, reference logits, compressed logits, reference cache, compressed cache) after
    every call; phase is "prompt", "compressed" (the last prompt call, after compress()) or "decode"."""
    ids, pad = left_pad(prompts)
    full = lm.new_cache(len(prompts), pad=pad)
    compressed = lm.new_cache(len(prompts), pad=pad, compression=policy)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            call = ids[:, start:start + chunk]
            reference, got = lm(call, full, 1)[:, -1], lm(call, compressed, 1)[:, -1]
            last = start + chunk >= ids.shape[1]
            if last:
                compressed.compress()
            yield ("compressed" if last else "prompt"), reference, got, full, compressed
        for _ in range(steps):
            token = reference.argmax(-1)
            reference, got = decode_step(lm, token, full), decode_step(lm, token, compressed)
            yield "decode", reference, got, full, compressed


def layer_bytes(cache):
    if isinstance(cache, CompressedCache):
        return [layer.store.nbytes() for layer in cache.layers]
    return [tensor_bytes(layer.keys, layer.values) for layer in cache.layers]


WINDOWED = {"snapkv-above-window": SnapKV(1000), "h2o-above-window": H2O(1000),
            "streamingllm-above-window": StreamingLLM(1000), "snapkv": SnapKV(8, window=4), "h2o": H2O(8),
            "streamingllm": StreamingLLM(8), "corm": CORM(window=8), "tova": TOVA(8), "tova-above-window": TOVA(1000)}


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_a_sliding_window_cache_never_holds_more_than_transformers_own(name):
    """Mistral, window 16, a 40-token prompt (and a left-padded 29-token one): between calls every
    compressed layer holds at most what transformers' DynamicSlidingWindowLayer holds (its last
    window - 1 tokens), plus, while decoding, the current token (written in place, not concatenated
    for the call). A budget above the window reaches that bound exactly and gives transformers' logits."""
    policy = WINDOWED[name]
    lm = TransformersLM(hf_model("mistral", sliding_window=WINDOW))
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (40, 29)]
    above_window = policy.budget is not None and policy.budget >= WINDOW
    phases = []
    for phase, reference, got, full, compressed in teacher_forced(lm, prompts, policy):
        phases.append(phase)
        entries = [layer.store.entries for layer in compressed.layers]
        transformers_bytes, compressed_bytes = layer_bytes(full), layer_bytes(compressed)
        assert transformers_bytes == [2 * (WINDOW - 1) * ONE_TOKEN] * 3 or phase == "prompt"
        if phase == "decode":
            assert max(entries) <= WINDOW
            allowed = [n + 2 * ONE_TOKEN for n in transformers_bytes]  # + the current token of both rows
        else:
            budget = WINDOW - 1 if policy.budget is None else min(policy.budget, WINDOW - 1)
            assert phase == "prompt" or max(entries) <= budget
            allowed = transformers_bytes
        assert all(c <= a for c, a in zip(compressed_bytes, allowed))
        if above_window:  # the bound is reached: it is exact
            assert compressed_bytes == allowed
            torch.testing.assert_close(got, reference, rtol=0, atol=2e-5)
    assert phases.count("decode") == 8


@pytest.mark.parametrize("policy", [SnapKV(1000), SnapKV(30, window=4), CORM(window=8), AdaKV(30, window=4)],
                         ids=["snapkv-everything", "snapkv-30", "corm", "adakv-30"])
def test_a_growing_cache_never_holds_more_than_transformers_own(policy):
    """Full attention, policies that let the cache grow while decoding: never more entries than the
    tokens seen, i.e. never more bytes than transformers' DynamicCache after the same tokens."""
    lm = TransformersLM(hf_model("llama"))
    for phase, reference, got, full, compressed in teacher_forced(lm, [torch.randint(1, 300, (40,)).tolist()],
                                                                   policy, steps=20):
        assert all(c <= t for c, t in zip(layer_bytes(compressed), layer_bytes(full)))
        if policy.budget == 1000:  # keeps everything: exactly transformers' cache and logits
            assert layer_bytes(compressed) == layer_bytes(full)
            torch.testing.assert_close(got, reference, rtol=0, atol=2e-5)


def test_a_sliding_window_model_keeps_full_layers_at_their_budget():
    """Qwen2 with use_sliding_window and max_window_layers=1: layer 0 attends fully and keeps its
    budget, layers 1 and 2 keep at most their window; a budget above the prompt gives transformers'
    own logits (it holds the whole prompt on layer 0 and the window on the others)."""
    model = hf_model("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    lm = TransformersLM(model)
    prompts = [torch.randint(1, 300, (40,)).tolist()]
    for policy in (SnapKV(24, window=4), H2O(24)):
        for phase, reference, got, full, compressed in teacher_forced(lm, prompts, policy):
            entries = [layer.store.entries for layer in compressed.layers]
            transformers_bytes, compressed_bytes = layer_bytes(full), layer_bytes(compressed)
            if phase == "compressed":
                assert entries == [24, WINDOW - 1, WINDOW - 1]
                assert compressed_bytes[0] == 24 * ONE_TOKEN < transformers_bytes[0]
            if phase == "decode":
                assert entries[1:] == [WINDOW, WINDOW]
                assert entries[0] == 24 or not isinstance(policy, H2O)  # H2O keeps its budget while decoding
            current = ONE_TOKEN if phase == "decode" else 0
            assert compressed_bytes[0] <= transformers_bytes[0]
            assert all(c <= t + current for c, t in zip(compressed_bytes[1:], transformers_bytes[1:]))
    for phase, reference, got, full, compressed in teacher_forced(lm, prompts, SnapKV(1000)):
        torch.testing.assert_close(got, reference, rtol=0, atol=2e-5)


def test_streamingllm_on_a_sliding_window_frees_its_sinks_once_out_of_it():
    """A prompt shorter than the window keeps its sinks; once a sink leaves the window it is freed and
    its entry reused by a new token, whose key must stay its own (not the re-rotated sink's): every
    step equals the model run afresh on the kept tokens (one layer: K/V depend on token and position)."""
    model = hf_model("mistral", layers=1, sliding_window=WINDOW)
    lm = TransformersLM(model)
    cache = lm.new_cache(1, compression=StreamingLLM(8, n_sink=4))
    tokens = torch.randint(1, 300, (10,)).tolist()
    with torch.no_grad():
        logits = prefill(lm, torch.tensor([tokens]), cache, 16)
        for _ in range(14):
            tokens.append(int(logits.argmax(-1)))
            logits = decode_step(lm, torch.tensor(tokens[-1:]), cache)
            newest = len(tokens) - 1
            sinks = [s for s in range(4) if newest - s < WINDOW]  # the sinks this query still sees
            attended = sinks + list(range(newest - (8 - len(sinks)) + 1, newest + 1))
            afresh = model(torch.tensor([[tokens[s] for s in attended]])).logits[:, -1]
            torch.testing.assert_close(logits, afresh, rtol=0, atol=1e-5)
            store = cache.layers[0].store
            kept = sorted(s for s in store.slots[0, 0].tolist() if s >= 0)
            assert kept == [s for s in attended if newest + 1 - s < WINDOW]  # what the next query sees
    assert sinks == [] and store.entries == 8


@pytest.mark.parametrize("beams", [1, 3])
def test_transformers_generate_on_a_sliding_window_model_keeps_only_the_window(beams):
    model = hf_model("mistral", sliding_window=WINDOW)
    ids, mask = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beams, pad_token_id=0)
    policy = SnapKV(1000)
    cache = CompressedCache(model, policy, 2, (mask == 0).sum(-1))
    out = hf_generate(model, ids, policy, cache=cache, **options)
    torch.testing.assert_close(out, model.generate(ids, **options), rtol=0, atol=0)
    assert [layer.store.entries for layer in cache.layers] == [WINDOW] * 3  # not the 40 + 12 tokens seen


def test_each_layer_store_knows_its_window():
    """Read per layer, as each attention passes it: Mistral's config window on every layer, Qwen2's on
    the layers from max_window_layers on, none on Llama."""
    for model, windows in ((hf_model("mistral", sliding_window=WINDOW), [WINDOW] * 3),
                           (hf_model("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                            [None, WINDOW, WINDOW]),
                           (hf_model("qwen2", sliding_window=WINDOW), [None] * 3),  # use_sliding_window=False
                           (hf_model("llama"), [None] * 3)):
        cache = TransformersLM(model).new_cache(1, compression=SnapKV(8))
        assert [layer.store.sliding_window for layer in cache.layers] == windows


def test_a_cache_built_for_other_windows_is_refused():
    lm = TransformersLM(hf_model("mistral", sliding_window=WINDOW))
    cache = lm.new_cache(1, compression=SnapKV(1000))
    cache.layers[1].store.sliding_window = None  # as if read wrongly from the model
    with pytest.raises(InputError, match="layer 1 attends with sliding window 16"):
        lm(torch.randint(1, 300, (1, 5)), cache, 1)


def test_infllm_is_refused_on_a_sliding_window_layer_before_holding_anything():
    """InfLLM's memory units hold tokens no sliding-window query could see: refused when the cache is
    built, on Mistral and on a Qwen2 with some windowed layers (not after the prompt's first call)."""
    policy = InfLLM(n_init=4, n_local=16, block_size=8, topk=2)
    for model in (hf_model("mistral", sliding_window=WINDOW),
                  hf_model("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)):
        with pytest.raises(BudgetError, match="sliding-window layer"):
            TransformersLM(model).new_cache(1, compression=policy)
    assert TransformersLM(hf_model("qwen2")).new_cache(1, compression=policy)  # no window: accepted


def test_unsupported_models_and_bad_budgets():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(InputError, match="supports transformers models of type"):
        TransformersLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    lm = TransformersLM(hf_model())
    with pytest.raises(ValueError, match="budget"):
        lm.new_cache(1, compression=SnapKV(-3))
    scaled = hf_model(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 256})
    with pytest.raises(InputError, match="plain RoPE"):
        TransformersLM(scaled).new_cache(1, compression=StreamingLLM(16))


def test_beam_reordering_of_a_compressed_cache():
    lm = TransformersLM(hf_model())
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (40, 28)]
    ids, pad = left_pad(prompts)
    cache = lm.new_cache(2, pad=pad, compression=H2O(0.3))
    token = prefill(lm, ids, cache, 16).argmax(-1)
    expected = decode_step(lm, token, cache).flip(0)
    cache = lm.new_cache(2, pad=pad, compression=H2O(0.3))
    prefill(lm, ids, cache, 16)
    cache.reorder_cache(torch.tensor([1, 0]))  # the rows' padding moves with them
    torch.testing.assert_close(decode_step(lm, token.flip(0), cache), expected, rtol=0, atol=1e-5)


def padded_batch(lengths=(40, 31)):
    return left_padded([torch.randint(1, 300, (n,)).tolist() for n in lengths])


@pytest.mark.parametrize("policy", [SnapKV(1000), StreamingLLM(1000), H2O(1000),
                                    InfLLM(n_init=4, n_local=16, block_size=8, topk=64, positions="true")],
                         ids=["snapkv", "streamingllm", "h2o", "infllm"])
@pytest.mark.parametrize("beams", [1, 3])
def test_transformers_generate_with_a_budget_above_the_prompt_is_plain_generate(policy, beams):
    model = hf_model("qwen2")
    ids, mask = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beams, pad_token_id=0)
    expected = model.generate(ids, **options)
    torch.testing.assert_close(hf_generate(model, ids, policy, **options), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "h2o", "corm", "infllm", "tova", "adakv"])
def test_transformers_generate_follows_the_compressed_cache(name):
    """generate() on a cache compressed to a few entries == yoco's own decode loop on the same cache."""
    model = hf_model("llama")
    ids, mask = padded_batch()
    policy = {"streamingllm": StreamingLLM(12), "snapkv": SnapKV(12, window=4), "h2o": H2O(12),
              "corm": CORM(12, window=4), "infllm": InfLLM(n_init=4, n_local=16, block_size=8, topk=1),
              "tova": TOVA(12), "adakv": AdaKV(12, window=4)}[name]
    out = hf_generate(model, ids, policy, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    lm = TransformersLM(model)
    cache = lm.new_cache(2, pad=(mask == 0).sum(-1), compression=policy)
    lm(ids[:, :-1], cache, num_logits=0)
    cache.compress()
    logits, tokens = lm(ids[:, -1:], cache, 1)[:, -1], []
    for _ in range(10):
        tokens.append(logits.argmax(-1))
        logits = decode_step(lm, tokens[-1], cache)
    assert out[:, ids.shape[1]:].tolist() == torch.stack(tokens, 1).tolist()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain)  # the compression did change what was generated


def test_transformers_generate_refuses_what_it_cannot_do():
    model = hf_model("llama")
    ids, mask = padded_batch()
    with pytest.raises(InputError, match="left padding"):
        hf_generate(model, ids, SnapKV(8), attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(InputError, match="at least 2"):
        hf_generate(model, ids[:, :1], SnapKV(8), max_new_tokens=2)
    one_real = mask.clone()
    one_real[1, :-1] = 0
    with pytest.raises(InputError, match="at least 2 real"):
        hf_generate(model, ids, SnapKV(8), attention_mask=one_real, max_new_tokens=2)
    policy = StreamingLLM(8)
    cache = CompressedCache(model, policy, 2, (mask == 0).sum(-1))
    hf_generate(model, ids, policy, attention_mask=mask, cache=cache, max_new_tokens=2, pad_token_id=0)
    assert cache.nbytes() == 3 * 2 * 2 * 2 * 16 * 8 * 4  # layers, K/V, rows, heads, head dim, budget, fp32
    with pytest.raises(InputError, match="empty CompressedCache"):
        hf_generate(model, ids, policy, attention_mask=mask, cache=cache, max_new_tokens=2)
    with pytest.raises(InputError, match="empty CompressedCache"):  # built without the padding
        hf_generate(model, ids, policy, attention_mask=mask, past_key_values=CompressedCache(model, policy, 2))
    assert model.config._attn_implementation != "yoco_compressed"  # restored after every call


# ---------------------------------------------------------------------- transformers' generate() on yoco models
YOCO_POLICIES = {"snapkv": lambda budget: SnapKV(budget, window=4), "streamingllm": StreamingLLM}


def yoco_padded_batch(lengths=(40, 31)):
    ids, pad = left_pad([torch.randint(1, 200, (n,)).tolist() for n in lengths])
    return ids, (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()


@pytest.mark.parametrize("variant", ["yoco-swa", "transformer", "mla"])
@pytest.mark.parametrize("name", sorted(YOCO_POLICIES))
def test_transformers_generate_on_a_yoco_model_with_a_budget_above_the_prompt_is_plain_generate(variant, name):
    from yoco import YocoForCausalLM

    model = YocoForCausalLM.from_yoco(make_model(variant)).eval()
    ids, mask = yoco_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **options)
    torch.testing.assert_close(hf_generate(model, ids, YOCO_POLICIES[name](1000), **options), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["yoco-swa", "transformer"])
@pytest.mark.parametrize("name", sorted(YOCO_POLICIES))
def test_transformers_generate_on_a_yoco_model_follows_yocos_engine(variant, name):
    """A small budget: transformers' generate() gives the tokens of yoco's own engine on the same policy
    (the prompt but its last token prefilled and compressed, then greedy decode from the last one)."""
    from yoco import YocoCache, YocoForCausalLM

    core = make_model(variant)
    model = YocoForCausalLM.from_yoco(core).eval()
    ids, mask = yoco_padded_batch()
    policy = YOCO_POLICIES[name](12)
    cache = YocoCache(core, compression=policy)
    out = hf_generate(model, ids, policy, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                      cache=cache, prefill_chunk=16)
    assert any(isinstance(c, CompressedKV) and c.compressed for c in cache.inner.layers)
    engine_cache = core.new_cache(2, pad=(mask == 0).sum(-1), compression=policy)
    full_cache = core.new_cache(2, pad=(mask == 0).sum(-1))
    with torch.no_grad():
        prefill(core, ids[:, :-1], engine_cache, 16)
        prefill(core, ids[:, :-1], full_cache, 16)
        logits, tokens = decode_step(core, ids[:, -1], engine_cache), []
        first_logits, full_logits = logits, decode_step(core, ids[:, -1], full_cache)
        for _ in range(10):
            tokens.append(logits.argmax(-1))
            logits = decode_step(core, tokens[-1], engine_cache)
    assert out[:, ids.shape[1]:].tolist() == torch.stack(tokens, 1).tolist()
    assert cache.nbytes() == engine_cache.nbytes() < full_cache.nbytes()
    # the compression did change what the model computes (a tiny model's greedy tokens may not show it)
    assert (first_logits - full_logits).abs().max() > 1e-3


def test_transformers_generate_on_a_yoco_model_refuses_a_foreign_cache():
    from yoco import YocoCache, YocoForCausalLM

    core = make_model("yoco-swa")
    model = YocoForCausalLM.from_yoco(core).eval()
    ids, mask = yoco_padded_batch()
    policy = SnapKV(12)
    with pytest.raises(InputError, match="empty YocoCache"):
        hf_generate(model, ids, policy, attention_mask=mask, max_new_tokens=2, cache=YocoCache(core))
    with pytest.raises(InputError, match="empty YocoCache"):
        hf_generate(model, ids, policy, attention_mask=mask, max_new_tokens=2,
                    cache=YocoCache(core, compression=SnapKV(12)))
