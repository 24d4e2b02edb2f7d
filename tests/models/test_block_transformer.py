"""Block Transformer: cached/chunked inference == full forward, blocks from each row's first real token
whatever its padding, rows kept in phase through select/repeat, cache size."""

import pytest
import torch
from harness import make_model

from yoco.config import ConfigError, get_config
from yoco.engine import decode_step, left_pad, prefill
from yoco.models.block_transformer import BlockTransformer

ATOL = RTOL = 1e-5


def caches(cache, group: int = 0) -> list:
    """One phase group's caches: block KVs, local KVs, the current block's ids."""
    return cache.layers[0].groups[group].layers


def local_len(model, cache, group: int = 0) -> int:
    return caches(cache, group)[model.n_block_layers].length


@pytest.mark.parametrize("prompt_len", [12, 13])
@pytest.mark.parametrize("chunk", [1, 3, 5, 8])
def test_chunked_prefill_and_decode_equal_full_forward(prompt_len, chunk):
    model = make_model("block")
    b, P = model.block_len, model.block_prefix
    ids = torch.randint(1, model.config.vocab_size, (1, prompt_len + 11))  # decode crosses 3 blocks
    with torch.no_grad():
        full = model(ids)
        # Every logit from chunked calls (chunks straddle block boundaries), then one token at a time.
        cache = model.new_cache(1, capacity=ids.shape[1])
        got = []
        for s in range(0, prompt_len, chunk):
            got.append(model(ids[:, s:min(s + chunk, prompt_len)], cache))
            assert local_len(model, cache) == P + cache.seen % b
        for t in range(prompt_len, ids.shape[1]):
            got.append(model(ids[:, t:t + 1], cache, num_logits=1))
            assert local_len(model, cache) == P + cache.seen % b
        torch.testing.assert_close(torch.cat(got, dim=1), full, atol=ATOL, rtol=RTOL)
        # The engine's path: prefill chunks without logits (token decoder mostly skipped), then decode.
        cache = model.new_cache(1, capacity=ids.shape[1])
        out = [prefill(model, ids[:, :prompt_len], cache, chunk)]
        out += [decode_step(model, ids[:, t], cache) for t in range(prompt_len, ids.shape[1] - 1)]
        torch.testing.assert_close(torch.stack(out, dim=1), full[:, prompt_len - 1:-1], atol=ATOL, rtol=RTOL)


def test_num_logits_selects_last_positions():
    model = make_model("block")
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        full = model(ids)
        for k in (1, 4, 7):
            torch.testing.assert_close(model(ids, num_logits=k), full[:, -k:], atol=ATOL, rtol=RTOL)
        assert model(ids, num_logits=0) is None


def test_blocks_start_at_each_rows_first_real_token():
    """Rows of every phase in one left-padded batch (pads 0..b-1 modulo b, and whole pad blocks): each
    row's logits, full forward and cached, are those of the row alone without any padding."""
    model = make_model("block")
    b = model.block_len
    lengths, new = [13, 6, 11, 8, 2], 9
    seqs = [torch.randint(1, model.config.vocab_size, (n + new,)).tolist() for n in lengths]
    ids, pad = left_pad([s[:n] for s, n in zip(seqs, lengths)])
    assert sorted({int(p) % b for p in pad}) == [0, 1, 2, 3] and int(pad.max()) >= 2 * b
    ids = torch.cat([ids, torch.tensor([s[n:] for s, n in zip(seqs, lengths)])], dim=1)
    width = max(lengths)
    with torch.no_grad():
        batched = model(ids, pad=pad)
        cache = model.new_cache(len(lengths), capacity=ids.shape[1], pad=pad)
        assert len(cache.layers[0].groups) == 4  # one per phase
        out = [prefill(model, ids[:, :width], cache, 5)]
        out += [decode_step(model, ids[:, t], cache) for t in range(width, ids.shape[1] - 1)]
        cached = torch.stack(out, dim=1)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            alone = model(torch.tensor([s]))[0]
            torch.testing.assert_close(batched[row, pad[row]:], alone, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(cached[row], alone[n - 1:-1], atol=ATOL, rtol=RTOL)


def test_selecting_and_repeating_rows_keeps_each_rows_phase():
    model = make_model("block")
    prompts = [torch.randint(1, model.config.vocab_size, (n,)).tolist() for n in (9, 6, 7)]
    ids, pad = left_pad(prompts)
    token = torch.tensor([5, 6, 7])
    with torch.no_grad():
        cache = model.new_cache(3, capacity=16, pad=pad)
        prefill(model, ids, cache, 4)
        expected = decode_step(model, token, cache)
        cache = model.new_cache(3, capacity=16, pad=pad)
        prefill(model, ids, cache, 4)
        order = torch.tensor([2, 0, 0, 1])  # beams: reordered, one row twice
        got = decode_step(model, token[order], cache.select(order))
        torch.testing.assert_close(got, expected[order], atol=ATOL, rtol=RTOL)
        repeated = model.new_cache(3, capacity=16, pad=pad)
        prefill(model, ids, repeated, 4)
        got = decode_step(model, token.repeat_interleave(2), repeated.repeat(2))
        torch.testing.assert_close(got, expected.repeat_interleave(2, dim=0), atol=ATOL, rtol=RTOL)


def test_cache_bytes_match_formula_and_local_cache_is_constant():
    model = make_model("block")
    cfg, b, L = model.config, model.block_len, model.n_block_layers
    local_bytes = set()
    for context in (1, 4, 13, 64):
        cache = model.new_cache(2, capacity=context)
        assert cache.nbytes() == BlockTransformer.cache_bytes_for(cfg, 2, context, torch.float32)
        assert cache.nbytes() == model.cache_bytes_formula(2, context, torch.float32)
        local_bytes.add(sum(c.nbytes() for c in caches(cache)[L:]))
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (2, context)), cache, num_logits=0)
        assert [c.length for c in caches(cache)[:L]] == [context // b] * L  # one entry per completed block
        assert cache.nbytes() == BlockTransformer.cache_bytes_for(cfg, 2, context, torch.float32)
    assert len(local_bytes) == 1
    # The block-decoder part grows by one block's K/V per b tokens of context.
    per_block = BlockTransformer.cache_bytes_for(cfg, 1, 8, torch.float32) - \
        BlockTransformer.cache_bytes_for(cfg, 1, 4, torch.float32)
    assert per_block == L * 2 * cfg.n_kv_heads * cfg.head_dim * 4


def test_block_len_must_divide_dim():
    with pytest.raises(ConfigError, match="block_len=3"):
        BlockTransformer(get_config("block", "tiny", block_len=3))
