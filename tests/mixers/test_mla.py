"""Multi-head latent attention: latent-only cache, absorbed decode == decompressed, cross-layer reuse,
adapters on the up-projections honoured by the absorbed paths."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import CPU, cpu_step, engine_logits, make_model, rms_norm_reference
from torch import nn
from torch.nn.utils import parametrize

from yoco.cache import CacheError
from yoco.compress import SnapKV
from yoco.config import get_config
from yoco.layers import RotaryEmbedding
from yoco.mixers.mla import LatentCache, MultiHeadLatentAttention, computes_plain_linear, effective_linear

D_C, D_R = 24, 8


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # inference: caches hold plain tensors (copy.deepcopy needs graph leaves)
        yield


def _config(q_rank=None):
    config = get_config("mla", "tiny", mla_kv_rank=D_C, mla_rope_dim=D_R, mla_q_rank=q_rank)
    assert (config.dim, config.n_heads, config.head_dim) == (64, 4, 16)
    return config


def _rotary(config):
    return RotaryEmbedding(config.mla_rope_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)


def _mla(config, rotary, layer=0, kv_source=None, seed=0):
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(config, rotary, layer=layer, kv_source=kv_source)
    with torch.no_grad():  # non-trivial norm gains so the reference must apply them
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m.eval()


def _x(B, T, seed, dim=64):
    return torch.randn(B, T, dim, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- naive reference (float64)
def _rope(x, pos, theta):
    """Explicit 'half'-paired standard RoPE of x [B, T, ..., d] at positions pos [T] or [B, T]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = pos.double()[..., None] * inv
    if pos.dim() == 1:
        ang = ang[None]
    while ang.dim() < x.dim():
        ang = ang.unsqueeze(-2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def naive_latent(m, x, pos, config):
    """c [B, S, d_c] and RoPE'd k_R [B, S, d_R] from the producer's weights."""
    x = x.double()
    c = rms_norm_reference(x @ m.kv_down.weight.double().T, m.kv_norm.weight, config.norm_eps)
    k_r = _rope(x @ m.k_rope.weight.double().T, pos, config.rope_theta)
    return c, k_r


def naive_mla(m, x, pos, c, k_r, visible, config):
    """Per head: K_h = [W_uk_h c ; k_R], V_h = W_uv_h c, softmax(q_h K_h^T / sqrt(d_nope + d_R)) V_h."""
    x = x.double()
    H, dn, dr = config.n_heads, config.head_dim, config.mla_rope_dim
    if config.mla_q_rank is None:
        q = x @ m.q_proj.weight.double().T
    else:
        q_latent = rms_norm_reference(x @ m.q_down.weight.double().T, m.q_norm.weight, config.norm_eps)
        q = q_latent @ m.q_up.weight.double().T
    B, T, _ = x.shape
    q = q.view(B, T, H, dn + dr)
    q = torch.cat((q[..., :dn], _rope(q[..., dn:], pos, config.rope_theta)), dim=-1)
    w_uk = m.k_up.weight.double().view(H, dn, -1)
    w_uv = m.v_up.weight.double().view(H, dn, -1)
    heads = []
    for h in range(H):
        k_h = torch.cat((c @ w_uk[h].T, k_r), dim=-1)  # [B, S, dn + dr]
        v_h = c @ w_uv[h].T
        scores = q[:, :, h] @ k_h.transpose(1, 2) / (dn + dr) ** 0.5  # [B, T, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v_h)
    o = torch.cat(heads, dim=-1)
    return (o @ m.o_proj.weight.double().T).float()


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("q_rank", [None, 12])
def test_absorbed_decode_equals_decompressed_with_padding(q_rank):
    config = _config(q_rank)
    m = _mla(config, _rotary(config))
    B, T0 = 3, 6
    pad = torch.tensor([0, 2, 5])
    x = _x(B, T0 + 3, seed=1)
    cache = m.new_cache(B, dtype=torch.float32, device=CPU, capacity=16)
    m(x[:, :T0], cpu_step(0, T0, pad), cache)
    for t in range(T0, T0 + 3):
        step = cpu_step(t, 1, pad)
        outs = {}
        for absorb in (True, False):
            m.absorb = absorb
            outs[absorb] = m(x[:, t:t + 1], step, copy.deepcopy(cache))
        torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
        assert outs[True].abs().max() > 1e-3
        m.absorb = None
        torch.testing.assert_close(m(x[:, t:t + 1], step, cache), outs[True], atol=1e-6, rtol=1e-6)
    # a multi-token chunk through the absorbed path (enable_gqa branch) agrees as well
    chunk = cpu_step(T0 + 3, 4, pad)
    x2 = _x(B, 4, seed=2)
    m.absorb = True
    a = m(x2, chunk, copy.deepcopy(cache))
    m.absorb = False
    b = m(x2, chunk, copy.deepcopy(cache))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_automatic_decode_uses_absorbed_path_on_the_cache_view(monkeypatch):
    import yoco.kernels

    config = _config()
    m = _mla(config, _rotary(config))
    x = _x(2, 5, seed=3)
    cache = m.new_cache(2, dtype=torch.float32, device=CPU, capacity=8)
    m(x[:, :4], cpu_step(0, 4), cache)

    def no_decompress(*args):
        raise AssertionError("decode must not decompress the cache")

    seen = []
    kernel = yoco.kernels.attend

    def spy(q, k, v, *args, **kwargs):
        seen.append(k)
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(m, "decompressed", no_decompress)
    monkeypatch.setattr(yoco.kernels, "attend", spy)
    m(x[:, 4:], cpu_step(4, 1), cache)
    assert len(seen) == 1 and seen[0].data_ptr() == cache.kv.data_ptr()  # the buffer itself, no copy
    assert seen[0].shape == (2, 1, 5, D_C + D_R)


@pytest.mark.parametrize("q_rank", [None, 12])
@pytest.mark.parametrize("padded", [False, True])
def test_full_forward_equals_chunked_prefill_and_decode(q_rank, padded):
    config = _config(q_rank)
    m = _mla(config, _rotary(config))
    B, T = 2, 13
    pad = torch.tensor([0, 3]) if padded else None
    x = _x(B, T, seed=4)
    full = m(x, cpu_step(0, T, pad))
    cache = m.new_cache(B, dtype=torch.float32, device=CPU, capacity=None)
    outs, start = [], 0
    for n in (3, 5):  # chunks not dividing the prompt, then token-by-token decode
        outs.append(m(x[:, start:start + n], cpu_step(start, n, pad), cache))
        start += n
    while start < T:
        outs.append(m(x[:, start:start + 1], cpu_step(start, 1, pad), cache))
        start += 1
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_rank", [None, 12])
def test_matches_naive_reference(q_rank):
    config = _config(q_rank)
    m = _mla(config, _rotary(config))
    B, T = 2, 7
    x = _x(B, T, seed=5)
    pos = torch.arange(T)
    c, k_r = naive_latent(m, x, pos, config)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ref = naive_mla(m, x, pos, c, k_r, causal, config)
    torch.testing.assert_close(m(x, cpu_step(0, T)), ref, atol=1e-5, rtol=1e-5)
    # and the cached latent is exactly [c ; k_R]
    cache = m.new_cache(B, dtype=torch.float32, device=CPU, capacity=T)
    m(x, cpu_step(0, T), cache)
    torch.testing.assert_close(cache.kv, torch.cat((c, k_r), dim=-1).float(), atol=1e-5, rtol=1e-5)


def test_naive_reference_with_padding():
    config = _config()
    m = _mla(config, _rotary(config))
    B, T = 2, 6
    pad = torch.tensor([0, 2])
    x = _x(B, T, seed=6)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp_min(0)
    c, k_r = naive_latent(m, x, pos, config)
    s = torch.arange(T)
    visible = (s[None, :, None] >= s[None, None, :]) & (s[None, None, :] >= pad[:, None, None])
    visible |= torch.eye(T, dtype=torch.bool)[None]  # a pad query sees only itself
    ref = naive_mla(m, x, pos, c, k_r, visible, config)
    torch.testing.assert_close(m(x, cpu_step(0, T, pad)), ref, atol=1e-5, rtol=1e-5)


def test_latent_cache_bytes_pointer_overflow_and_growth():
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = LatentCache(3, D_C, D_R, dtype=dtype, device=CPU, capacity=10)
        assert cache.nbytes() == 3 * 10 * (D_C + D_R) * size
        assert cache.kv.shape == (3, 10, D_C + D_R)
    config = _config()
    m = _mla(config, _rotary(config))
    x = _x(2, 6, seed=7)
    cache = m.new_cache(2, dtype=torch.float32, device=CPU, capacity=6)
    ptr, nbytes = cache.kv.data_ptr(), cache.nbytes()
    m(x[:, :3], cpu_step(0, 3), cache)
    for t in range(3, 6):
        m(x[:, t:t + 1], cpu_step(t, 1), cache)
        assert cache.kv.data_ptr() == ptr and cache.nbytes() == nbytes
    with pytest.raises(CacheError, match="holds 6 positions"):
        m(x[:, :1], cpu_step(6, 1), cache)
    # growing: starts at 256, doubles, keeps what was written
    grow = LatentCache(1, D_C, D_R, dtype=torch.float32, device=CPU)
    first = torch.randn(1, 200, D_C + D_R)
    second = torch.randn(1, 100, D_C + D_R)
    grow.append(first)
    view = grow.append(second)
    assert grow.capacity == 512 and grow.length == 300 and view.shape == (1, 300, D_C + D_R)
    torch.testing.assert_close(view, torch.cat((first, second), dim=1))
    with pytest.raises(CacheError):
        LatentCache(1, D_C, D_R, dtype=torch.float32, capacity=0)


def test_consumer_reuses_producer_latent():
    config = _config(q_rank=12)
    rotary = _rotary(config)
    producer = _mla(config, rotary, layer=0, seed=0)
    consumer = _mla(config, rotary, layer=1, kv_source=0, seed=1)
    names = {n for n, _ in consumer.named_parameters()}
    assert not any(n.startswith(("kv_down", "kv_norm", "k_rope")) for n in names)
    assert {"q_down.weight", "q_up.weight", "k_up.weight", "v_up.weight", "o_proj.weight"} <= names
    assert {"kv_down.weight", "k_rope.weight"} <= {n for n, _ in producer.named_parameters()}

    B, T = 2, 7
    x0, x1 = _x(B, T, seed=8), _x(B, T, seed=9)
    shared = {}
    producer(x0, cpu_step(0, T), shared=shared)
    out = consumer(x1, cpu_step(0, T), shared=shared)
    pos = torch.arange(T)
    c, k_r = naive_latent(producer, x0, pos, config)  # the producer's latent, the consumer's weights
    ref = naive_mla(consumer, x1, pos, c, k_r, torch.ones(T, T, dtype=torch.bool).tril(), config)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # its own latent would give something else
    own = naive_mla(consumer, x1, pos, *naive_latent(producer, x1, pos, config), torch.ones(T, T).tril().bool(), config)
    assert (own - out).abs().max() > 1e-3

    # cached: prefill + absorbed decode through the producer's cache equals the uncached forward
    cache = producer.new_cache(B, dtype=torch.float32, device=CPU, capacity=T)
    outs = []
    for start, n in ((0, 4), (4, 1), (5, 1), (6, 1)):
        shared = {}
        producer(x0[:, start:start + n], cpu_step(start, n), cache, shared=shared)
        assert shared[0] is cache  # the producer's cache itself, read by the consumer
        outs.append(consumer(x1[:, start:start + n], cpu_step(start, n), shared=shared))
    torch.testing.assert_close(torch.cat(outs, dim=1), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(CacheError):
        consumer.new_cache(B, dtype=torch.float32, device=CPU, capacity=4)


def test_consumer_without_shared_latent_names_source_layer():
    config = _config()
    rotary = _rotary(config)
    consumer = _mla(config, rotary, layer=3, kv_source=2)
    x = _x(1, 4, seed=10)
    with pytest.raises(LookupError, match="latent of layer 2"):
        consumer(x, cpu_step(0, 4))
    with pytest.raises(LookupError, match="latent of layer 2"):
        consumer(x, cpu_step(0, 4), shared={0: torch.zeros(1, 4, D_C + D_R)})


# ---------------------------------------------------------------------- adapters on k_up / v_up
class LowRankAdapted(nn.Module):
    """A LoRA-style adapter: the base Linear plus a low-rank update ``x A^T B^T`` (B non-zero, as
    after fine-tuning; LoRA starts with B = 0, where an ignored adapter would go unnoticed)."""

    def __init__(self, base: nn.Linear, rank: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.down = nn.Parameter(0.5 * torch.randn(rank, base.in_features, generator=g))
        self.up = nn.Parameter(0.5 * torch.randn(base.out_features, rank, generator=g))

    @property
    def weight(self):  # as peft's LoRA layers do: the base weight, without the update
        return self.base.weight

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


class ScaledShifted(nn.Module):
    """A weight parametrization: W -> 1.5 W + 0.1 (reading ``weight`` evaluates it, so the absorbed
    paths honoured it already; kept as a guard for the fast path)."""

    def forward(self, weight):
        return 1.5 * weight + 0.1


def lora_wrapped(model):
    for i, layer in enumerate(model.layers):
        layer.mixer.k_up = LowRankAdapted(layer.mixer.k_up, seed=2 * i)
        layer.mixer.v_up = LowRankAdapted(layer.mixer.v_up, seed=2 * i + 1)


def parametrized(model):
    for layer in model.layers:
        for proj in (layer.mixer.k_up, layer.mixer.v_up):
            parametrize.register_parametrization(proj, "weight", ScaledShifted())


def hooked(model):
    # an affine forward hook: its shift is a bias (softmax-invariant on k_up, added to every value on v_up)
    for layer in model.layers:
        for proj in (layer.mixer.k_up, layer.mixer.v_up):
            proj.register_forward_hook(lambda module, inputs, out: 1.5 * out + 0.1)


def peft_lora(model):
    import peft  # a test dependency: the adapter people actually put on these projections

    # init_lora_weights=False: B starts non-zero, so the adapter changes the model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_up", "v_up"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)


ADAPTERS = {"lora-style": lora_wrapped, "parametrization": parametrized, "forward-hook": hooked, "peft-lora": peft_lora}


# a budget above the prompt: the compressed latent keeps every token, so the logits must not change
@pytest.mark.parametrize("compression", [None, SnapKV(1000)], ids=["latent-cache", "compressed-latent"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_absorbed_decode_honours_adapters_on_k_up_and_v_up(adapter, compression):
    """Decode (absorbed: the latent cache's single-token steps, and every call through a compressed
    latent) must compute what the full forward (decompressed: it calls k_up and v_up) computes."""
    model = make_model("mla")
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    before = model(ids)
    ADAPTERS[adapter](model)
    full = model(ids)
    assert (full - before).abs().max() > 1e-3  # the adapter does change the model
    got = engine_logits(model, ids, 12, chunk=5, compression=compression)
    torch.testing.assert_close(got, full[:, 11:], atol=1e-5, rtol=1e-5)


def test_a_plain_linear_gives_its_own_weight_and_anything_else_is_probed():
    config = _config()
    m = _mla(config, _rotary(config))
    weight, bias = effective_linear(m.k_up, D_C, torch.zeros(1))
    assert weight is m.k_up.weight and bias is None  # the fast path: no copy, no call
    handle = m.k_up.register_forward_hook(lambda module, inputs, out: -out)
    weight, bias = effective_linear(m.k_up, D_C, torch.zeros(1))
    torch.testing.assert_close(weight, -m.k_up.weight, rtol=0, atol=0)
    assert not bias.any()
    handle.remove()
    assert computes_plain_linear(m.k_up)
