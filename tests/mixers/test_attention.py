"""GQA attention, causal self-attention with KVCache, and YOCO cross-attention masks."""

from __future__ import annotations

import pytest
import torch
from harness import cpu_step, naive_attention

from yoco.cache import CacheError, KVCache
from yoco.config import get_config
from yoco import layers
from yoco.layers import RotaryEmbedding
from yoco.kernels import attend, slot_mask
from yoco.mixers.attention import CausalSelfAttention
from yoco.cache import CallKV
from yoco.mixers.cross_attention import CrossAttention, GlobalKV
from yoco.mixers.sliding_window import window_band


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("H,n_kv", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_attend_gqa_matches_repeated_kv(H, n_kv):
    B, T, S, d = 2, 5, 7, 8
    q, k, v = _rand(B, H, T, d, seed=1), _rand(B, n_kv, S, d, seed=2), _rand(B, n_kv, S, d, seed=3)
    torch.testing.assert_close(attend(q, k, v), naive_attention(q, k, v).float(), atol=1e-5, rtol=1e-5)


def test_attend_gqa_groups_are_contiguous():
    # query head h must use kv head h // (H // n_kv) (repeat_interleave), not h % n_kv (repeat)
    B, H, n_kv, T, d = 1, 4, 2, 3, 4
    q = torch.zeros(B, H, T, d)
    k = torch.zeros(B, n_kv, T, d)
    v = torch.stack([torch.full((T, d), 1.0), torch.full((T, d), 2.0)]).unsqueeze(0)
    out = attend(q, k, v)
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("bf16_arithmetic", [False, True])
@pytest.mark.parametrize("mask", ["causal", "band"])
def test_attend_under_bf16_autocast_with_gradients_attends_the_rounded_values_in_fp32_where_the_cpu_lacks_bf16(
        mask, bf16_arithmetic, monkeypatch):
    monkeypatch.setattr(layers, "CPU_BF16_ARITHMETIC", bf16_arithmetic)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 24, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(2))
    band = window_band(24, 0, 5, torch.bfloat16, torch.device("cpu"))  # a float mask in the values' dtype
    kwargs = {"causal": True} if mask == "causal" else {"mask": band}

    def run(attention):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        return o, torch.autograd.grad(o.float().square().sum(), (q, k, v))

    o, grads = run(lambda q, k, v: attend(q, k, v, **kwargs))
    o_bf16, grads_bf16 = run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=kwargs.get("mask"), is_causal="causal" in kwargs, enable_gqa=True))
    assert o.dtype == torch.bfloat16
    if bf16_arithmetic:
        assert o.equal(o_bf16)
        return
    rounded = [t.detach().bfloat16().float() for t in (q, k, v)]
    in_fp32 = torch.nn.functional.scaled_dot_product_attention(
        *rounded, attn_mask=None if "causal" in kwargs else band.float(), is_causal="causal" in kwargs, enable_gqa=True)
    assert o.equal(in_fp32.bfloat16())  # fp32 attention, not bf16's
    reference = naive_attention(*(t.detach().bfloat16().float() for t in (q, k, v)),
                                visible=torch.ones(24, 24).tril().bool() if mask == "causal" else band.float() == 0)
    torch.testing.assert_close(o.float(), reference.bfloat16().float(), rtol=2 ** -7, atol=1e-5)
    for g, g_bf16 in zip(grads, grads_bf16):  # bf16 attention's gradients: within its rounding
        torch.testing.assert_close(g, g_bf16, rtol=0.05, atol=0.05 * g_bf16.abs().max().item())


def test_attend_causal_and_mask():
    B, H, n_kv, T, d = 2, 4, 2, 6, 8
    q, k, v = _rand(B, H, T, d, seed=4), _rand(B, n_kv, T, d, seed=5), _rand(B, n_kv, T, d, seed=6)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    ref = naive_attention(q, k, v, tril).float()
    torch.testing.assert_close(attend(q, k, v, causal=True), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, tril[None, None]), ref, atol=1e-5, rtol=1e-5)
    # a per-row mask broadcast over heads
    mask = slot_mask(torch.arange(T), torch.arange(T), torch.tensor([0, 2]))
    ref_pad = naive_attention(q, k, v, mask).float()
    torch.testing.assert_close(attend(q, k, v, mask), ref_pad, atol=1e-5, rtol=1e-5)
    # causal is ignored when an explicit mask is given (the mask alone decides)
    full = torch.ones(1, 1, T, T, dtype=torch.bool)
    torch.testing.assert_close(attend(q, k, v, full, causal=True), naive_attention(q, k, v).float(),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- CausalSelfAttention
def _module(seed=0, arch="transformer"):
    config = get_config(arch, "tiny")
    torch.manual_seed(seed)
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
    return config, CausalSelfAttention(config, rotary).eval()


def test_causal_self_attention_matches_naive():
    config, module = _module(seed=1)
    T = 11
    x = _rand(2, T, config.dim, seed=7)
    with torch.no_grad():
        y = module(x, cpu_step(0, T))
        q, k, v = module.qkv(x, cpu_step(0, T))
        ref = module.out(naive_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril()).float())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", [40, None])
def test_causal_self_attention_full_chunked_and_decode(capacity):
    config, module = _module(seed=2)
    B = 2
    sizes = [3, 5, 1, 9, 2, 1, 7]
    T = sum(sizes)
    x = _rand(B, T, config.dim, seed=8)
    with torch.no_grad():
        full = module(x, cpu_step(0, T))

        cache = module.new_cache(B, dtype=torch.float32, device="cpu", capacity=capacity)
        pieces, start = [], 0
        for n in sizes:
            pieces.append(module(x[:, start:start + n], cpu_step(start, n), cache))
            start += n
            assert cache.length == start
        chunked = torch.cat(pieces, dim=1)

        cache2 = module.new_cache(B, dtype=torch.float32, device="cpu", capacity=capacity)
        stepwise = torch.cat([module(x[:, t:t + 1], cpu_step(t, 1), cache2) for t in range(T)], dim=1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)
    if capacity is not None:
        assert cache.capacity == capacity
        assert cache.nbytes() == 2 * B * config.n_kv_heads * capacity * config.head_dim * 4
    torch.testing.assert_close(cache.k[:, :, :T], cache2.k[:, :, :T], atol=1e-6, rtol=1e-6)


def test_causal_self_attention_left_padding():
    config, module = _module(seed=3)
    T, p = 9, 4
    pad = torch.tensor([0, p])
    x = _rand(2, T, config.dim, seed=9)
    with torch.no_grad():
        full = module(x, cpu_step(0, T, pad))
        alone = module(x[1:, p:], cpu_step(0, T - p))
        row0 = module(x[:1], cpu_step(0, T))
        cache = module.new_cache(2, dtype=torch.float32, device="cpu", capacity=T)
        pieces = [module(x[:, :5], cpu_step(0, 5, pad), cache)]
        pieces += [module(x[:, t:t + 1], cpu_step(t, 1, pad), cache) for t in range(5, T)]
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[1:, p:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:1], row0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- KVCache
def _tokens(start, n, B=1, n_kv=1, d=2):
    # value at slot s is s, so contents can be checked exactly
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(B, n_kv, n, d).clone()


def test_kv_cache_grows_by_doubling_and_preserves_contents():
    cache = KVCache(1, 1, 2, dtype=torch.float32, capacity=None)
    assert cache.growing and cache.capacity == 256 and cache.length == 0
    k, v = cache.append(_tokens(0, 250), -_tokens(0, 250))
    assert cache.capacity == 256 and k.shape == (1, 1, 250, 2)
    k, v = cache.append(_tokens(250, 10), -_tokens(250, 10))  # 260 > 256: doubles
    assert cache.capacity == 512 and cache.length == 260
    assert torch.equal(k[0, 0, :, 0], torch.arange(260, dtype=torch.float32))
    assert torch.equal(v[0, 0, :, 1], -torch.arange(260, dtype=torch.float32))
    assert cache.nbytes() == 2 * 512 * 2 * 4
    k, v = cache.append(_tokens(260, 1000), -_tokens(260, 1000))  # more than double: exactly what's needed
    assert cache.capacity == 1260 and cache.length == 1260
    assert torch.equal(k[0, 0, :, 0], torch.arange(1260, dtype=torch.float32))
    assert torch.equal(v[0, 0, :, 0], -torch.arange(1260, dtype=torch.float32))
    k, v = cache.append(_tokens(1260, 1), -_tokens(1260, 1))
    assert cache.capacity == 2520
    assert torch.equal(k[0, 0, :, 1], torch.arange(1261, dtype=torch.float32))


def test_kv_cache_fixed_capacity_overflow_raises():
    cache = KVCache(2, 2, 4, dtype=torch.float32, capacity=5)
    assert not cache.growing
    cache.append(_tokens(0, 3, 2, 2, 4), _tokens(0, 3, 2, 2, 4))
    cache.append(_tokens(3, 2, 2, 2, 4), _tokens(3, 2, 2, 2, 4))  # exactly full is fine
    assert cache.length == 5 and cache.capacity == 5
    with pytest.raises(CacheError, match="5"):
        cache.append(_tokens(5, 1, 2, 2, 4), _tokens(5, 1, 2, 2, 4))
    # the failed write changed nothing
    assert cache.length == 5 and cache.capacity == 5
    assert torch.equal(cache.k[0, 0, :, 0], torch.arange(5, dtype=torch.float32))
    cache2 = KVCache(1, 1, 2, dtype=torch.float32, capacity=3)
    with pytest.raises(CacheError):
        cache2.append(_tokens(0, 4), _tokens(0, 4))
    with pytest.raises(CacheError):
        KVCache(1, 1, 2, dtype=torch.float32, capacity=0)


def test_module_cache_overflow_raises():
    config, module = _module(seed=4)
    cache = module.new_cache(1, dtype=torch.float32, device="cpu", capacity=4)
    with torch.no_grad():
        module(_rand(1, 4, config.dim, seed=10), cpu_step(0, 4), cache)
        with pytest.raises(CacheError):
            module(_rand(1, 1, config.dim, seed=11), cpu_step(4, 1), cache)


# ---------------------------------------------------------------------- cross-attention
def _kernel_calls(monkeypatch):
    """Record (mask, causal) of every call of the attention kernel the caches run."""
    import yoco.kernels

    calls, kernel = [], yoco.kernels.attend

    def spy(q, k, v, mask=None, causal=False, scale=None):
        calls.append((mask, causal))
        return kernel(q, k, v, mask, causal, scale)

    monkeypatch.setattr(yoco.kernels, "attend", spy)
    return calls


def _global_kv(n, seed=20):
    kv = CallKV()
    kv.append(_rand(2, 2, n, 8, seed=seed), _rand(2, 2, n, 8, seed=seed + 1))
    return kv


def test_cross_attention_square_unpadded_is_causal_without_mask(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    _global_kv(7).attend(_rand(2, 4, 7, 8, seed=22), cpu_step(0, 7))
    assert len(calls) == 1 and calls[0][0] is None and calls[0][1] is True


def test_cross_attention_other_cases(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    kv = _global_kv(7)
    # decode step against a longer key set: everything visible -> no mask, not the causal path
    kv.attend(_rand(2, 4, 1, 8, seed=23), cpu_step(6, 1))
    assert calls[-1][0] is None and calls[-1][1] is False
    # a later chunk: causal attention offset by the start slot
    q = _rand(2, 4, 3, 8, seed=24)
    tril = torch.ones(7, 7, dtype=torch.bool).tril()[4:]
    torch.testing.assert_close(kv.attend(q, cpu_step(4, 3)), naive_attention(q, kv.k, kv.v, tril).float(),
                               atol=1e-5, rtol=1e-5)
    # square but padded: explicit mask
    pad = torch.tensor([0, 2])
    _global_kv(4).attend(_rand(2, 4, 4, 8, seed=25), cpu_step(0, 4, pad))
    mask, causal = calls[-1]
    assert causal is False and mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask, slot_mask(torch.arange(4), torch.arange(4), pad))


def test_cross_attention_prefill_equals_incremental():
    config = get_config("yoco-swa", "tiny")
    torch.manual_seed(5)
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
    gkv, cross = GlobalKV(config, rotary).eval(), CrossAttention(config, rotary).eval()
    B, T = 2, 12
    h = _rand(B, T, config.dim, seed=12)
    x = _rand(B, T, config.dim, seed=13)
    with torch.no_grad():
        kv = gkv(h, cpu_step(0, T))
        k, v = kv.k, kv.v
        assert k.shape == (B, config.n_kv_heads, T, config.head_dim)
        full = cross(x, cpu_step(0, T), kv)

        # naive: causal attention of RoPE'd queries against the global K/V
        cos, sin = rotary.tables(torch.arange(T))
        q = rotary.apply(cross.q_proj(x).view(B, T, config.n_heads, config.head_dim), cos, sin).transpose(1, 2)
        o = naive_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril()).float()
        ref = cross.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)

        cache = gkv.new_cache(B, dtype=torch.float32, device="cpu", capacity=T)
        pieces, start = [], 0
        for n in (5, 1, 4, 1, 1):
            step = cpu_step(start, n)
            assert gkv(h[:, start:start + n], step, cache) is cache
            assert cache.length == start + n
            pieces.append(cross(x[:, start:start + n], step, cache))
            start += n
        torch.testing.assert_close(cache.k, k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.v, v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,S", [(1, 1), (5, 5), (5, 12), (16, 100), (3, 64)])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_chunk_attention_equals_masked_attention(T, S, n_kv):
    from yoco.kernels import chunk_attention

    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, n_kv, S, 8), torch.randn(2, n_kv, S, 8)
    mask = slot_mask(torch.arange(S - T, S), torch.arange(S), None)
    expected = attend(q, k, v, mask, causal=mask is None)
    torch.testing.assert_close(chunk_attention(q, k, v), expected, atol=1e-6, rtol=1e-5)


def test_attention_parts_of_keys_whose_rows_are_not_contiguous():
    # torch's private CPU flash kernel misreads a key whose last dim is strided (a transposed view gives
    # wrong numbers, not an error); attention_part hands it rows it can read, masked or not
    from yoco.kernels import attention_part

    q = _rand(1, 4, 3, 8, seed=1)
    k = _rand(1, 2, 8, 6, seed=2).transpose(2, 3)  # [1, 2, 6, 8], stride 1 along the positions
    v = _rand(1, 2, 6, 8, seed=3)
    assert k.stride(-1) != 1
    allowed = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    allowed[..., 4:] = False
    for mask in (None, allowed):
        out, _ = attention_part(q, k, v, mask)
        torch.testing.assert_close(out, naive_attention(q, k.contiguous(), v, None if mask is None else mask[0, 0]).float(),
                                   atol=1e-5, rtol=1e-5)
