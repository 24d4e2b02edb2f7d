"""Cache bytes equal the formulas, caches are preallocated and written in place."""

import pytest
import torch
from harness import make_model

from yoco import CacheError, KVCache, build_model
from yoco.cache import RowBatch
from yoco.engine import decode_step, prefill
from yoco.mixers.gated_deltanet import DeltaNetState
from yoco.mixers.retention import RetentionState


@pytest.mark.parametrize("context", [1, 17, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_formula(variant, context, dtype):
    model = make_model(variant).to(dtype)
    cfg = model.config
    assert model.new_cache(3, capacity=context).nbytes() == model.cache_bytes_formula(3, context, dtype)
    # The formulas written out, independently of the model code.
    b = dtype.itemsize
    if cfg.arch == "transformer":
        positions = cfg.window if cfg.window else context
        producers = len(set(cfg.kv_sources))  # layers that own K/V; the rest read them
        per_layer = cfg.mla_kv_rank + cfg.mla_rope_dim if cfg.attention == "mla" else 2 * cfg.n_kv_heads * cfg.head_dim
        expected = 3 * producers * per_layer * b * positions
    elif cfg.arch == "block":
        per_position = 2 * cfg.n_kv_heads * cfg.head_dim * b
        n_block = cfg.n_layers // 2
        blocks = max(1, -(-context // cfg.block_len))  # one block-decoder entry per block of context
        local = (cfg.n_layers - n_block) * per_position * (cfg.block_prefix + cfg.block_len)
        expected = 3 * (n_block * per_position * blocks + local + cfg.block_len * 8)  # + the block's int64 ids
    elif cfg.arch == "yoco-swa":
        expected = 3 * (2 * cfg.n_kv_heads * cfg.head_dim * b * context
                        + cfg.self_layers * 2 * cfg.n_kv_heads * cfg.head_dim * cfg.window * b)
    elif cfg.arch == "yoco-gdn":
        # per layer: an fp32 state of H heads x (3/4 dim / H keys) x twice as many values, and the last 3
        # inputs of the convolution over q, k (3/4 dim each) and v (3/2 dim)
        heads, keys = cfg.n_deltanet_heads, 3 * cfg.dim // 4
        per_layer = heads * (keys // heads) * (2 * keys // heads) * 4 + 3 * (keys + keys + 2 * keys) * b
        expected = 3 * (2 * cfg.n_kv_heads * cfg.head_dim * b * context + cfg.self_layers * per_layer)
    else:
        d = cfg.dim // cfg.n_retention_heads
        expected = 3 * (2 * cfg.n_kv_heads * cfg.head_dim * b * context + cfg.self_layers * cfg.n_retention_heads * d * d * 4)
    assert model.cache_bytes_formula(3, context, dtype) == expected


@pytest.mark.parametrize("arch", ["yoco-swa", "yoco-gret", "yoco-gdn"])
def test_yoco_cache_grows_only_by_the_global_kv(arch):
    model = make_model(arch)
    cfg = model.config
    short, long = model.new_cache(1, capacity=200), model.new_cache(1, capacity=800)
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * 4
    assert long.nbytes() - short.nbytes() == 600 * per_token
    # Only the last entry (the global KV) depends on context; the self-decoder caches are equal.
    assert [c.nbytes() for c in short.layers[:-1]] == [c.nbytes() for c in long.layers[:-1]]
    # A Transformer of the same shape grows by L times as much.
    transformer = build_model("transformer", preset="tiny")
    grow = transformer.new_cache(1, capacity=800).nbytes() - transformer.new_cache(1, capacity=200).nbytes()
    assert grow == cfg.n_layers * 600 * per_token


def test_measured_bytes_after_generation_equal_formula(variant):
    model = make_model(variant)
    prompt, new = 45, 10
    cache = model.new_cache(2, capacity=prompt + new)
    ids = torch.randint(0, 256, (2, prompt + new))
    with torch.no_grad():
        prefill(model, ids[:, :prompt], cache, chunk=16)
        for t in range(prompt, prompt + new):
            decode_step(model, ids[:, t], cache)
    assert cache.seen == prompt + new
    assert cache.nbytes() == model.cache_bytes_formula(2, prompt + new, torch.float32)


def test_preallocated_caches_are_written_in_place(variant):
    model = make_model(variant)
    cache = model.new_cache(1, capacity=60)
    def pointers():
        # K/V and latent buffers (full, ring, global, MLA); a retention or DeltaNet state is constant-size
        # and replaced per step.
        layers = [part for c in cache.layers for part in (c.parts() if hasattr(c, "parts") else [c])]
        return [getattr(c, name).data_ptr() for c in layers if not isinstance(c, (RetentionState, DeltaNetState))
                for name in c.batch_fields]
    ids = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        prefill(model, ids[:, :30], cache, chunk=8)
        before = pointers()
        for t in range(30, 60):
            decode_step(model, ids[:, t], cache)
    assert pointers() == before  # no reallocation, no concatenation


def test_growing_kv_cache_doubles_and_keeps_contents():
    cache = KVCache(1, 2, 4, dtype=torch.float32)
    assert cache.capacity == 256
    k = torch.randn(1, 2, 300, 4)
    cache.append(k[:, :, :200], k[:, :, :200])
    keys, _ = cache.append(k[:, :, 200:], k[:, :, 200:])
    assert cache.capacity == 512 and torch.equal(keys, k)


def test_fixed_capacity_overflow_raises():
    cache = KVCache(1, 1, 4, dtype=torch.float32, capacity=3)
    cache.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(CacheError, match="holds 3 positions"):
        cache.append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_repeated_cache_continues_each_row(variant):
    model = make_model(variant)
    ids = torch.randint(0, 256, (2, 40))
    cache = model.new_cache(2, capacity=50)
    with torch.no_grad():
        prefill(model, ids[:, :30], cache, chunk=8)
        forked = cache.repeat(3)
        assert forked.batch_size == 6 and forked.seen == 30
        assert forked.nbytes() == 3 * cache.nbytes()
        for t in range(30, 40):
            expected = decode_step(model, ids[:, t], cache)
            got = decode_step(model, ids[:, t].repeat_interleave(3), forked)
            torch.testing.assert_close(got, expected.repeat_interleave(3, dim=0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "yoco-gret", "mla", "mla-q-cla2", "mlkv",
                                     "transformer-window", "yoco-gret-split3"])
def test_row_batch_decodes_rows_at_different_positions_as_each_alone(variant):
    """One call over one-row caches of different lengths (RowBatch) gives each row the logits its own
    cache gives it alone, and advances every row's cache by one slot."""
    model = make_model(variant).eval()
    prompts = [list(range(1, 8)), list(range(20, 45)), [3, 3]]
    with torch.inference_mode():
        alone = [model.new_cache(1, capacity=40) for _ in prompts]
        batched = [model.new_cache(1, capacity=40) for _ in prompts]
        for p, a, b in zip(prompts, alone, batched):
            prefill(model, torch.tensor([p]), a, 4)
            prefill(model, torch.tensor([p]), b, 4)
        for step in range(3):
            feed = torch.tensor([[7 + step], [11], [200 - step]])
            together = model(feed, RowBatch(batched), num_logits=1)[:, -1]
            each = torch.cat([model(feed[i:i + 1], c, num_logits=1)[:, -1] for i, c in enumerate(alone)])
            torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-5)
    assert [c.seen for c in batched] == [len(p) + 3 for p in prompts]
    assert RowBatch(batched).nbytes() == sum(c.nbytes() for c in alone)


def test_row_batch_refuses_caches_of_several_rows():
    model = make_model("transformer")
    with pytest.raises(CacheError, match="one-row caches"):
        RowBatch([model.new_cache(2, capacity=8)])
    with pytest.raises(CacheError, match="one-row caches"):
        RowBatch([])
