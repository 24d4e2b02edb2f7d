"""Sliding-window attention: blocked prefill vs a naive masked softmax, window edges, ring cache."""

from __future__ import annotations

import pytest
import torch
from harness import cpu_step, naive_attention

from yoco.cache import CacheError
from yoco.config import get_config
from yoco.layers import RotaryEmbedding
from yoco.kernels import slot_mask
from yoco.mixers.sliding_window import RingKVCache, SlidingWindowAttention, blocked_window_attention, window_band


def naive_window(q, k, v, window, q_start=0, k_start=0):
    """Explicit float64 softmax; key slot s visible to query slot t iff t - W < s <= t."""
    T, S = q.shape[2], k.shape[2]
    t = torch.arange(q_start, q_start + T)[:, None]
    s = torch.arange(k_start, k_start + S)[None, :]
    return naive_attention(q, k, v, visible=(s <= t) & (s > t - window))


def _qkv(B, H, n_kv, T, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g), torch.randn(B, n_kv, T, d, generator=g),
            torch.randn(B, n_kv, T, d, generator=g))


CASES = [  # (T, W, block)
    (5, 8, 4),     # T < W
    (8, 8, 8),     # T == W
    (9, 8, 8),     # T == W + 1
    (9, 8, 3),
    (70, 6, 16),   # T >> W
    (70, 6, 6),
    (23, 4, 5),    # block does not divide T
    (23, 7, 64),   # block > T
    (12, 1, 5),    # W = 1
    (12, 1, 1),
]


@pytest.mark.parametrize("T,W,block", CASES)
def test_blocked_matches_naive_gqa(T, W, block):
    q, k, v = _qkv(2, 4, 2, T, 8, seed=T * 100 + W)
    out = blocked_window_attention(q, k, v, 0, 0, W, None, block)
    assert out.shape == q.shape
    torch.testing.assert_close(out, naive_window(q, k, v, W).float(), atol=1e-5, rtol=1e-5)


def test_window_one_sees_only_itself():
    q, k, v = _qkv(1, 4, 2, 10, 8, seed=1)
    out = blocked_window_attention(q, k, v, 0, 0, 1, None, 4)
    expected = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T2,W,block", [(1, 5, 4), (7, 5, 4), (3, 8, 64), (20, 3, 6)])
def test_blocked_with_previous_keys(T2, W, block):
    # queries are the last T2 slots of a longer sequence; keys start W-1 slots earlier (as from a ring)
    T = 30
    q, k, v = _qkv(2, 4, 2, T, 8, seed=7 + T2)
    full_ref = naive_window(q, k, v, W).float()
    q_start = T - T2
    k_start = max(0, q_start - (W - 1))
    out = blocked_window_attention(q[:, :, q_start:], k[:, :, k_start:], v[:, :, k_start:], q_start, k_start,
                                   W, None, block)
    torch.testing.assert_close(out, full_ref[:, :, q_start:], atol=1e-5, rtol=1e-5)


def test_window_band_masks_what_each_query_does_not_see_and_is_built_once_per_shape():
    band = window_band(3, 4, 5, torch.float32, torch.device("cpu"))
    seen = band == 0  # query r (after 4 earlier keys) sees keys r .. r + 4 of the 7
    assert seen.tolist() == [[True, True, True, True, True, False, False],
                             [False, True, True, True, True, True, False],
                             [False, False, True, True, True, True, True]]
    assert torch.isneginf(band[~seen]).all()
    assert window_band(3, 4, 5, torch.float32, torch.device("cpu")) is band
    with torch.inference_mode():  # built inside inference mode, still usable where autograd tracks
        built_there = window_band(2, 1, 5, torch.float32, torch.device("cpu"))
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    (q @ q.transpose(-1, -2) + built_there[:, 1:]).sum().backward()


@pytest.mark.parametrize("W,block", [(8, 4), (8, 7), (8, 3), (5, 5), (6, 9), (16, 5)])
@pytest.mark.parametrize("k_behind", [None, 0, 2])
def test_blocked_matches_naive_at_every_offset(W, block, k_behind):
    # Every block kind (first blocks, full windows, a window's edge cutting a block, a short last
    # block), and keys that start a full window back (None), at the queries (0) or in between.
    T = 37
    q, k, v = _qkv(1, 4, 2, T, 8, seed=W * 10 + block)
    for q_start in (0, 3, 11, 20):
        k_start = max(0, q_start - (W - 1)) if k_behind is None else max(0, q_start - k_behind)
        visible_from = torch.arange(q_start, T)[:, None] - W < torch.arange(k_start, T)[None, :]
        causal = torch.arange(k_start, T)[None, :] <= torch.arange(q_start, T)[:, None]
        expected = naive_attention(q[:, :, q_start:], k[:, :, k_start:], v[:, :, k_start:],
                                   visible=visible_from & causal).float()
        out = blocked_window_attention(q[:, :, q_start:], k[:, :, k_start:], v[:, :, k_start:], q_start, k_start,
                                       W, None, block)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"q_start {q_start}: {m}")


@pytest.mark.parametrize("T,W,block", [(12, 4, 5), (12, 20, 4), (17, 3, 3)])
def test_blocked_with_left_padding(T, W, block):
    pads = [0, 3, 7]
    q, k, v = _qkv(len(pads), 4, 2, T, 8, seed=3 + W)
    pad = torch.tensor(pads)
    out = blocked_window_attention(q, k, v, 0, 0, W, pad, block)
    assert torch.isfinite(out).all()  # pad queries see themselves, so no NaN rows
    for b, p in enumerate(pads):
        ref = naive_window(q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], W).float()
        torch.testing.assert_close(out[b:b + 1, :, p:], ref, atol=1e-5, rtol=1e-5)
        if p:
            # a pad query attends only to itself
            expected_pad = v[b, :, :p].repeat_interleave(2, dim=0)
            torch.testing.assert_close(out[b, :, :p], expected_pad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("block", [1, 3, 4, 64])
def test_window_edge_is_exact(block):
    # q = k = 0: uniform attention over the visible keys; v one-hot per slot shows which slots are in.
    W, T = 4, 8
    q = torch.zeros(1, 2, T, T)
    k = torch.zeros(1, 1, T, T)
    v = torch.eye(T).view(1, 1, T, T)
    out = blocked_window_attention(q, k, v, 0, 0, W, None, block)
    for t in (W - 2, W - 1, W, W + 1, T - 1):
        n = min(t + 1, W)
        expected = torch.zeros(T)
        expected[t - n + 1:t + 1] = 1.0 / n
        # (the blocks' flash parts are merged by log-sum-exp: equal within rounding; the slots outside
        # the window are checked to be exactly 0 below)
        torch.testing.assert_close(out[0, 0, t], expected, atol=1e-6, rtol=0, msg=lambda m: f"slot {t}: {m}")
        torch.testing.assert_close(out[0, 1, t], expected, atol=1e-6, rtol=0)
    # slot t - W is excluded and slot t - W + 1 included
    assert out[0, 0, W, 0].item() == 0.0 and out[0, 0, W, 1].item() == pytest.approx(0.25, abs=1e-6)
    assert out[0, 0, W + 1, 1].item() == 0.0 and out[0, 0, W + 1, 2].item() == pytest.approx(0.25, abs=1e-6)
    assert (out[0, :, :, :] >= 0).all() and (out[0, 0, W:, :1] == 0).all()


# ---------------------------------------------------------------------- slot_mask
def test_slot_mask_none_when_nothing_masked():
    q_slots = torch.tensor([5])
    k_slots = torch.arange(6)
    assert slot_mask(q_slots, k_slots, None) is None
    assert slot_mask(q_slots, k_slots, None, window=6) is None
    assert slot_mask(q_slots, k_slots, torch.tensor([0, 0])) is None
    m = slot_mask(q_slots, k_slots, None, window=5)
    assert m is not None and m.shape == (1, 1, 1, 6)
    assert m[0, 0, 0].tolist() == [False, True, True, True, True, True]


def test_slot_mask_causal_and_empty_entries():
    m = slot_mask(torch.arange(3), torch.arange(3), None)
    assert m.shape == (1, 1, 3, 3)
    assert torch.equal(m[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    # ring buffer entries not yet written hold slot -1 and are never visible
    m = slot_mask(torch.tensor([1]), torch.tensor([0, 1, -1, -1]), None, window=4)
    assert m[0, 0, 0].tolist() == [True, True, False, False]


def test_slot_mask_pad_query_sees_itself():
    m = slot_mask(torch.arange(4), torch.arange(4), torch.tensor([0, 2]))
    assert m.shape == (2, 1, 4, 4)
    assert torch.equal(m[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert m[1, 0].tolist() == [
        [True, False, False, False],   # pad slot 0: itself only
        [False, True, False, False],   # pad slot 1: itself only (slot 0 is a pad)
        [False, False, True, False],   # first real token: pads hidden
        [False, False, True, True],
    ]
    # every row has at least one visible key
    assert m.any(-1).all()


# ---------------------------------------------------------------------- the module
def _module(window, block=None, seed=0):
    config = get_config("yoco-swa", "tiny", window=window)
    torch.manual_seed(seed)
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
    return config, SlidingWindowAttention(config, rotary, window, block).eval()


def test_module_default_block():
    assert _module(16)[1].block == 64
    assert _module(100)[1].block == 100
    assert _module(16, block=5)[1].block == 5


@pytest.mark.parametrize("window,block", [(16, None), (5, 4), (7, 3)])
def test_module_full_matches_naive(window, block):
    config, module = _module(window, block, seed=1)
    T = 40
    x = torch.randn(2, T, config.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = module(x, cpu_step(0, T))
        q, k, v = module.qkv(x, cpu_step(0, T))
        ref = module.out(naive_window(q, k, v, window).float())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,block", [(16, None), (5, 4), (7, 3)])
def test_module_full_equals_chunked_and_decode(window, block):
    config, module = _module(window, block, seed=3)
    B = 2
    sizes = [3, 5, 1, 16, 2, 1, 1, 7, 16, 3]
    T = sum(sizes)
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(4))
    expected_bytes = 2 * B * config.n_kv_heads * window * config.head_dim * 4
    with torch.no_grad():
        full = module(x, cpu_step(0, T))

        cache = module.new_cache(B, dtype=torch.float32, device="cpu")
        assert isinstance(cache, RingKVCache)
        assert cache.nbytes() == expected_bytes
        pieces, start = [], 0
        for n in sizes:
            pieces.append(module(x[:, start:start + n], cpu_step(start, n), cache))
            start += n
            assert cache.nbytes() == expected_bytes
            assert cache.length == start
        chunked = torch.cat(pieces, dim=1)

        ring = module.new_cache(B, dtype=torch.float32, device="cpu")
        steps = []
        for t in range(T):
            steps.append(module(x[:, t:t + 1], cpu_step(t, 1), ring))
            assert ring.nbytes() == expected_bytes
        stepwise = torch.cat(steps, dim=1)

    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)
    # both caches end holding the same last-W slots
    assert torch.equal(cache.slots.sort().values, torch.arange(T - window, T))
    assert torch.equal(ring.slots.sort().values, torch.arange(T - window, T))


def test_module_prefill_longer_than_window_then_decode():
    config, module = _module(6, 4, seed=5)
    B, T1, T = 1, 20, 26
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = module(x, cpu_step(0, T))
        cache = module.new_cache(B, dtype=torch.float32, device="cpu")
        first = module(x[:, :T1], cpu_step(0, T1), cache)
        rest = [module(x[:, t:t + 1], cpu_step(t, 1), cache) for t in range(T1, T)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-5, rtol=1e-5)


def test_module_left_padding_chunked_and_decode():
    config, module = _module(5, 4, seed=7)
    T = 14
    pads = [0, 4]
    pad = torch.tensor(pads)
    x = torch.randn(2, T, config.dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = module(x, cpu_step(0, T, pad))
        alone = module(x[1:, 4:], cpu_step(0, T - 4))
        row0 = module(x[:1], cpu_step(0, T))
        cache = module.new_cache(2, dtype=torch.float32, device="cpu")
        pieces = [module(x[:, :6], cpu_step(0, 6, pad), cache)]
        pieces += [module(x[:, t:t + 1], cpu_step(t, 1, pad), cache) for t in range(6, T)]
        chunked = torch.cat(pieces, dim=1)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[1:, 4:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:1], row0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_ring_cache_recent_and_write():
    ring = RingKVCache(1, 1, 2, 3, dtype=torch.float32)
    assert ring.nbytes() == 2 * 1 * 1 * 3 * 2 * 4
    assert ring.slots.tolist() == [-1, -1, -1]
    vals = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1).expand(1, 1, 5, 2)
    ring.write(vals[:, :, :2], vals[:, :, :2])
    assert ring.slots.tolist() == [0, 1, -1]
    with pytest.raises(CacheError):
        ring.recent(3)
    ring.write(vals[:, :, 2:5], vals[:, :, 2:5])  # more than fits: only the last 3 survive
    assert ring.length == 5
    assert ring.slots.tolist() == [3, 4, 2]
    k, v = ring.recent(3)
    assert k[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert v[0, 0, :, 1].tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(CacheError):
        ring.recent(4)
