"""CompressedKV on yoco's own models: no-op budgets change nothing, bytes follow the budget, StreamingLLM's
positions, left-padded batches, decode-time budgets, and what cannot be compressed."""

import pytest
import torch
from harness import POLICIES, make_model, run

from yoco.compress import CORM, H2O, BudgetError, CompressedKV, PyramidKV, SnapKV, StreamingLLM
from yoco.compress.policies import TOVA, AdaKV
from yoco.kernels import slot_mask
from yoco.layers import rotate_by
from yoco.engine import decode_step, generate, left_pad, prefill
from yoco.layers import RotaryEmbedding
from yoco.models.base import InputError

VARIANTS = ["transformer", "transformer-mqa", "cla2", "mla", "mla-q-cla2", "yoco-swa", "yoco-gret"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_budget_above_the_prompt_changes_nothing(variant, name):
    model = make_model(variant)
    prompts = [torch.randint(1, 200, (n,)).tolist() for n in (40, 27)]
    reference, _ = run(model, prompts, None)
    compressed, cache = run(model, prompts, POLICIES[name](1000))
    torch.testing.assert_close(compressed, reference, rtol=0, atol=2e-5)
    assert any(isinstance(c, CompressedKV) for c in cache.layers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bytes_follow_the_budget_per_layer(variant):
    model = make_model(variant)
    ids = torch.randint(1, 200, (2, 80))
    for policy in (SnapKV(20, window=8), StreamingLLM(0.25), H2O(0.25), TOVA(20), PyramidKV(24, window=8, beta=4)):
        cache = model.new_cache(2, compression=policy)
        prefill(model, ids, cache, 32)
        stores = [c for c in cache.layers if isinstance(c, CompressedKV)]
        for store in stores:
            kept = int(store.limit[0])
            if isinstance(policy, PyramidKV) and len(stores) > 1:
                assert kept == int(policy.limit(torch.tensor([80]), store.layer, len(stores))[0])
            else:
                # 20 tokens, 0.25 of 80, or PyramidKV's average on a single cache (YOCO)
                assert kept == (24 if isinstance(policy, PyramidKV) else 20)
            per_token = store.k[0, :, 0].numel() * store.k.element_size() * (1 if store.v is None else 2)
            assert store.nbytes() == 2 * kept * per_token
            assert bool((store.slots >= 0).all())
        if isinstance(policy, PyramidKV) and len(stores) > 1:
            assert stores[0].entries > stores[-1].entries  # the pyramid: fewer entries deeper


@pytest.mark.parametrize("variant", VARIANTS)
def test_adakv_bytes_follow_its_allocation_per_layer(variant):
    """AdaKV: each row holds exactly budget x heads tokens per layer, split unevenly between heads; the
    dense tensors are allocated for the largest head's share."""
    model = make_model(variant)
    ids = torch.randint(1, 200, (2, 80))
    cache = model.new_cache(2, compression=AdaKV(20, window=8))
    prefill(model, ids, cache, 32)
    stores = [c for c in cache.layers if isinstance(c, CompressedKV)]
    for store in stores:
        h = store.k.shape[1]
        assert store.live().sum(-1).tolist() == [20 * h] * 2  # live: the budget, shared by the heads
        assert store.live().tolist() == store.head_limit.tolist()
        assert bool((store.head_limit >= 8).all())  # the observation window, in every head
        per_token = store.k[0, 0, 0].numel() * store.k.element_size() * (1 if store.v is None else 2)
        assert store.entries == int(store.head_limit.max())
        assert store.nbytes() == 2 * h * int(store.head_limit.max()) * per_token  # allocated: the largest share
    if any(store.k.shape[1] > 1 for store in stores):
        assert any(bool((store.head_limit != 20).any()) for store in stores)  # the allocation is really uneven


def test_yoco_compresses_its_one_global_cache():
    model = make_model("yoco-swa")
    cache = model.new_cache(1, compression=SnapKV(0.25, window=8))
    prefill(model, torch.randint(1, 200, (1, 96)), cache, 32)
    stores = [c for c in cache.layers if isinstance(c, CompressedKV)]
    assert len(stores) == 1 and stores[0] is cache.layers[-1] and stores[0].entries == 24
    cfg = model.config
    rings = cfg.self_layers * 2 * cfg.n_kv_heads * cfg.head_dim * cfg.window * 4
    assert cache.nbytes() == rings + 2 * cfg.n_kv_heads * cfg.head_dim * 24 * 4


@pytest.mark.parametrize("variant", ["transformer", "transformer-mqa", "mla"])
def test_streamingllm_positions_equal_running_the_kept_tokens_afresh(variant):
    # one layer: its K/V depend only on the token and position, so the model run on the kept tokens
    # (sinks, then the recent window, at positions 0..n-1) must give the next token the same logits
    model = make_model(variant, n_layers=1)
    ids = torch.randint(1, 200, (1, 40))
    cache = model.new_cache(1, compression=StreamingLLM(12, n_sink=4))
    logits, tokens = prefill(model, ids, cache, 16), ids[0].tolist()
    for _ in range(10):
        tokens.append(int(logits.argmax(-1)))
        logits = decode_step(model, torch.tensor(tokens[-1:]), cache)
        kept = tokens[:4] + tokens[-8:]
        torch.testing.assert_close(logits, model(torch.tensor([kept]))[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["transformer", "transformer-mqa", "mla", "yoco-swa"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_left_padded_batch_equals_each_prompt_alone(variant, name):
    model = make_model(variant)
    prompts = [torch.randint(1, 200, (n,)).tolist() for n in (70, 45)]
    policy = POLICIES[name](0.3) if name != "corm" else CORM(window=8)
    batch, _ = run(model, prompts, policy, steps=12)
    for row, prompt in enumerate(prompts):
        alone, _ = run(model, [prompt], policy, steps=12)
        torch.testing.assert_close(batch[:, row], alone[:, 0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("policy", [StreamingLLM(24), H2O(24), CORM(24, window=8), TOVA(24),
                                    TOVA(24, heads="layer")])
def test_decode_keeps_the_budget(policy):
    model = make_model("transformer")
    ids, _ = left_pad([torch.randint(1, 200, (60,)).tolist()])
    out = generate(model, ids, 60, compression=policy)
    assert out.stats["compressed_prompt_bytes"] == out.cache_bytes  # 60 more tokens, not one more entry


def test_snapkv_grows_after_the_prompt():
    model = make_model("transformer")
    out = generate(model, torch.randint(1, 200, (1, 60)), 30, compression=SnapKV(16, window=8))
    assert out.cache_bytes > out.stats["compressed_prompt_bytes"]


def test_corm_evicts_tokens_no_recent_query_attends():
    # a hand-made cache: 1 row, 1 head, 12 tokens; queries attend only to token 0 and the newest ones
    policy = CORM(window=4, recent_queries=4)
    store = CompressedKV(policy, layer=0, n_layers=1, batch_size=1, n_kv_heads=1, key_dim=2, value_dim=2,
                         dtype=torch.float32)
    k = torch.zeros(1, 1, 12, 2)
    k[0, 0, 0] = torch.tensor([10.0, 0.0])  # every query attends to token 0
    store.append(k, torch.zeros_like(k))
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 12, 2)
    from yoco.layers import Step

    store.attend(q, Step(0, 12, None, torch.device("cpu")))
    store.compress()
    assert sorted(store.slots[store.slots >= 0].tolist()) == [0, 8, 9, 10, 11]


def test_entry_mask_rules():
    slots = torch.tensor([[[0, 5, 2, -1, 7]]])
    mask = slot_mask(torch.tensor([5, 6]), slots, torch.tensor([1]), none_if_unmasked=False)
    # slot 0 is the row's pad, -1 empty, 7 in the future
    assert mask[0, 0].tolist() == [[False, True, True, False, False], [False, True, True, False, False]]
    assert slot_mask(torch.tensor([6]), slots, None, window=3,
                     none_if_unmasked=False)[0, 0, 0].tolist() == [False, True, False, False, False]


def test_rotation_composes():
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    delta = torch.tensor([7, -3])
    torch.testing.assert_close(rotate_by(rotary, rotate_by(rotary, x, delta), -delta), x, rtol=0, atol=1e-5)


def test_what_cannot_be_compressed_says_so():
    with pytest.raises(InputError, match="no growing K/V cache"):
        make_model("transformer-window").new_cache(1, compression=SnapKV(0.5))
    with pytest.raises(InputError, match="Block Transformer"):
        make_model("block").new_cache(1, compression=SnapKV(0.5))
    cache = make_model("transformer").new_cache(1, compression=StreamingLLM(3))
    with pytest.raises(BudgetError, match="sink"):
        prefill(make_model("transformer"), torch.randint(1, 200, (1, 20)), cache, 8)


def test_selecting_rows_of_a_compressed_cache():
    # beam search and sampling several answers reorder or repeat rows of a compressed cache
    model = make_model("transformer")
    prompts = [torch.randint(1, 200, (n,)).tolist() for n in (50, 35)]
    ids, pad = left_pad(prompts)
    cache = model.new_cache(2, pad=pad, compression=H2O(0.3))
    logits = prefill(model, ids, cache, 16)
    swapped = cache.select(torch.tensor([1, 0]))
    token = logits.argmax(-1)
    torch.testing.assert_close(decode_step(model, token.flip(0), swapped), decode_step(model, token, cache).flip(0),
                               rtol=0, atol=1e-5)
