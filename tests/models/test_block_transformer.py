"""Block Transformer: cached/chunked inference == full forward, left padding by blocks, cache size."""

import pytest
import torch

from yoco.config import ConfigError, get_config
from yoco.engine import decode_step, prefill
from yoco.models.block_transformer import BlockTransformer

ATOL = RTOL = 1e-5


def make_model(**overrides) -> BlockTransformer:
    torch.manual_seed(0)
    return BlockTransformer(get_config("block", "tiny", **overrides)).eval()


def pad_to_block(tokens: list[int], b: int, length: int | None = None) -> tuple[list[int], int]:
    """Left-pad with token 0 to a multiple of b (or to `length`); return the ids and the pad count."""
    target = length if length is not None else -(-len(tokens) // b) * b
    return [0] * (target - len(tokens)) + tokens, target - len(tokens)


def local_len(model, cache) -> int:
    return cache.layers[model.n_block_layers].length


@pytest.mark.parametrize("prompt_len", [12, 13])
@pytest.mark.parametrize("chunk", [1, 3, 5, 8])
def test_chunked_prefill_and_decode_equal_full_forward(prompt_len, chunk):
    model = make_model()
    b, P = model.block_len, model.block_prefix
    seq = torch.randint(1, model.config.vocab_size, (prompt_len + 11,)).tolist()  # decode crosses 3 blocks
    padded, p = pad_to_block(seq[:prompt_len], b)
    ids = torch.tensor([padded + seq[prompt_len:]])
    start = len(padded)  # first decoded slot
    pad = torch.tensor([p])
    with torch.no_grad():
        full = model(ids, pad=pad if p else None)
        # Every logit from chunked calls (chunks straddle block boundaries), then one token at a time.
        cache = model.new_cache(1, capacity=ids.shape[1], pad=pad)
        got = []
        for s in range(0, start, chunk):
            got.append(model(ids[:, s:min(s + chunk, start)], cache))
            assert local_len(model, cache) == P + cache.seen % b
        for t in range(start, ids.shape[1]):
            got.append(model(ids[:, t:t + 1], cache, num_logits=1))
            assert local_len(model, cache) == P + cache.seen % b
        got = torch.cat(got, dim=1)
        torch.testing.assert_close(got[:, p:], full[:, p:], atol=ATOL, rtol=RTOL)
        # The engine's path: prefill chunks without logits (token decoder mostly skipped), then decode.
        cache = model.new_cache(1, capacity=ids.shape[1], pad=pad)
        out = [prefill(model, ids[:, :start], cache, chunk)]
        out += [decode_step(model, ids[:, t], cache) for t in range(start, ids.shape[1] - 1)]
        torch.testing.assert_close(torch.stack(out, dim=1), full[:, start - 1:-1], atol=ATOL, rtol=RTOL)


def test_num_logits_selects_last_positions():
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        full = model(ids)
        for k in (1, 4, 7):
            torch.testing.assert_close(model(ids, num_logits=k), full[:, -k:], atol=ATOL, rtol=RTOL)
        assert model(ids, num_logits=0) is None


def test_left_padded_batch_equals_each_row_alone():
    model = make_model()
    b = model.block_len
    lengths, new = [13, 6], 9
    seqs = [torch.randint(1, model.config.vocab_size, (n + new,)).tolist() for n in lengths]
    own = [pad_to_block(s[:n], b) for s, n in zip(seqs, lengths)]  # each prompt to a multiple of b
    width = max(len(ids) for ids, _ in own)
    rows, pads = zip(*(pad_to_block(s[:n], b, width) for s, n in zip(seqs, lengths)))
    assert list(pads) == [3, 10]  # row 1 has two blocks made only of pad slots
    ids = torch.tensor([r + s[n:] for r, s, n in zip(rows, seqs, lengths)])
    pad = torch.tensor(pads)
    with torch.no_grad():
        batched = model(ids, pad=pad)
        cache = model.new_cache(2, capacity=ids.shape[1], pad=pad)
        out = [prefill(model, ids[:, :width], cache, 5)]
        out += [decode_step(model, ids[:, t], cache) for t in range(width, ids.shape[1] - 1)]
        cached = torch.stack(out, dim=1)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            alone_ids, p0 = own[row]
            alone = model(torch.tensor([alone_ids + s[n:]]), pad=torch.tensor([p0]) if p0 else None)[0]
            torch.testing.assert_close(batched[row, pads[row]:], alone[p0:], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(cached[row], alone[len(alone_ids) - 1:-1], atol=ATOL, rtol=RTOL)


def test_cache_bytes_match_formula_and_local_cache_is_constant():
    model = make_model()
    cfg, b, L = model.config, model.block_len, model.n_block_layers
    local_bytes = set()
    for context in (1, 4, 13, 64):
        cache = model.new_cache(2, capacity=context)
        assert cache.nbytes() == BlockTransformer.cache_bytes_for(cfg, 2, context, torch.float32)
        assert cache.nbytes() == model.cache_bytes_formula(2, context, torch.float32)
        local_bytes.add(sum(c.nbytes() for c in cache.layers[L:]))
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (2, context)), cache, num_logits=0)
        assert [c.length for c in cache.layers[:L]] == [context // b] * L  # one entry per completed block
        assert cache.nbytes() == BlockTransformer.cache_bytes_for(cfg, 2, context, torch.float32)
    assert len(local_bytes) == 1
    # The block-decoder part grows by one block's K/V per b tokens of context.
    per_block = BlockTransformer.cache_bytes_for(cfg, 1, 8, torch.float32) - \
        BlockTransformer.cache_bytes_for(cfg, 1, 4, torch.float32)
    assert per_block == L * 2 * cfg.n_kv_heads * cfg.head_dim * 4


def test_block_len_must_divide_dim():
    with pytest.raises(ConfigError, match="block_len=3"):
        BlockTransformer(get_config("block", "tiny", block_len=3))
