"""Gated DeltaNet: naive / chunkwise / recurrent agreement, state carrying, the delta rule itself, and
the module against a hand-written float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import cpu_step, rms_norm_reference, run_in_pieces

from yoco.config import get_config
from yoco.mixers.gated_deltanet import (
    DeltaNetState,
    GatedDeltaNet,
    deltanet_chunkwise,
    deltanet_naive,
    deltanet_recurrent,
)

ATOL = 1e-5


def _inputs(B=2, H=2, T=37, dk=8, dv=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g)
    log_decay = -torch.rand(B, H, T, generator=g) * 0.3
    beta = torch.rand(B, H, T, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_decay, beta


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 37, 64])
def test_three_forms_agree_with_the_definition(chunk):
    q, k, v, ld, b = _inputs()
    ref, ref_state = deltanet_naive(q, k, v, ld, b)
    rec, rec_state = deltanet_recurrent(q, k, v, ld, b)
    out, state = deltanet_chunkwise(q, k, v, ld, b, chunk)
    assert out.shape == (2, 2, 37, 16) and state.shape == (2, 2, 8, 16) and state.dtype == torch.float32
    _close(rec, ref)
    _close(rec_state, ref_state)
    _close(out, ref)
    _close(state, ref_state)


@pytest.mark.parametrize("T1,chunk", [(1, 4), (10, 4), (13, 5), (20, 64), (36, 8)])
def test_state_carries_across_calls(T1, chunk):
    q, k, v, ld, b = _inputs(seed=1)
    init = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(9))
    whole, whole_state = deltanet_chunkwise(q, k, v, ld, b, chunk, init.clone())
    first = [t[:, :, :T1] for t in (q, k, v, ld, b)]
    rest = [t[:, :, T1:] for t in (q, k, v, ld, b)]
    o1, s1 = deltanet_chunkwise(*first, chunk, init.clone())
    o2, s2 = deltanet_recurrent(*rest, s1)  # a prefill continued token by token
    _close(torch.cat((o1, o2), dim=2), whole)
    _close(s2, whole_state)
    ref, ref_state = deltanet_naive(q, k, v, ld, b, init)
    _close(whole, ref)
    _close(whole_state, ref_state)


def test_the_delta_rule_replaces_a_keys_value():
    # with beta 1 and no decay, writing v2 at a key that holds v1 leaves exactly v2 at it (a linear
    # attention would hold v1 + v2), and other orthogonal keys keep theirs
    dk, dv = 4, 3
    k = torch.eye(dk)[None, None, [0, 1, 0]]  # keys e0, e1, e0
    v = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])[None, None]
    q = torch.eye(dk)[None, None, [0, 1, 0]]
    zeros, ones = torch.zeros(1, 1, 3), torch.ones(1, 1, 3)
    for form in (lambda *a: deltanet_chunkwise(*a, 2), deltanet_recurrent, deltanet_naive):
        o, state = form(q, k, v, zeros, ones)
        _close(state[0, 0, 0], torch.tensor([7.0, 8, 9]))
        _close(state[0, 0, 1], torch.tensor([4.0, 5, 6]))
        _close(o[0, 0, 2], torch.tensor([7.0, 8, 9]))


def test_decay_and_beta_both_matter():
    q, k, v, ld, b = _inputs(seed=4)
    out, _ = deltanet_chunkwise(q, k, v, ld, b, 8)
    assert (out - deltanet_chunkwise(q, k, v, torch.zeros_like(ld), b, 8)[0]).abs().max() > 1e-2
    assert (out - deltanet_chunkwise(q, k, v, ld, torch.ones_like(b), 8)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_state_is_fp32_for_bf16_inputs(form):
    q, k, v, ld, b = _inputs(dtype=torch.bfloat16, T=9)
    def run(*inputs, state=None):
        if form == "chunkwise":
            return deltanet_chunkwise(*inputs, 4, state)
        return deltanet_recurrent(*inputs, state)

    out, state = run(q, k, v, ld, b)
    assert state.dtype == torch.float32 and out.dtype == torch.float32
    _, ref_state = deltanet_naive(q.float(), k.float(), v.float(), ld, b)
    _close(state, ref_state, atol=1e-4)
    assert run(q, k, v, ld, b, state=state)[1].dtype == torch.float32


def test_autocast_leaves_the_forms_in_fp32():
    q, k, v, ld, b = _inputs(seed=5)
    plain = deltanet_chunkwise(q, k, v, ld, b, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = deltanet_chunkwise(q, k, v, ld, b, 8)
        stepped = deltanet_recurrent(q, k, v, ld, b)
    for (out, state), (ref, ref_state) in ((chunked, plain), (stepped, plain)):
        _close(out, ref)
        _close(state, ref_state)


# ---------------------------------------------------------------------- the module
def _module(seed=0, **overrides):
    config = get_config("yoco-gdn", "tiny", **overrides)
    torch.manual_seed(seed)
    return config, GatedDeltaNet(config).eval()


def _reference_module(module: GatedDeltaNet, x: torch.Tensor, config) -> torch.Tensor:
    """The layer written out token by token in float64: the convolution, SiLU, L2 norms, the gates and
    the delta rule in its matrix form, the gated head norm."""
    B, T, D = x.shape
    H, dk = config.n_deltanet_heads, config.deltanet_key_dim
    dv = 2 * dk
    W = {n: getattr(module, n).weight.detach().double() for n in ("qkv_proj", "a_proj", "b_proj", "g_proj", "out_proj")}
    conv = module.conv_weight.detach().double()  # [C, taps]
    taps = conv.shape[1]
    mixed = x.double() @ W["qkv_proj"].T  # [B, T, C]
    mixed = F.pad(mixed, (0, 0, taps - 1, 0))
    A = module.A_log.detach().double().exp()
    dt_bias = module.dt_bias.detach().double()
    norm_w = module.head_norm.weight.detach()
    S = torch.zeros(B, H, dk, dv, dtype=torch.float64)
    outs = []
    for t in range(T):
        xt = x[:, t].double()
        window = mixed[:, t:t + taps]  # [B, taps, C], the current token last
        c = F.silu((window * conv.T[None]).sum(1))
        q, k, v = c.split((H * dk, H * dk, H * dv), dim=-1)
        q = F.normalize(q.view(B, H, dk), dim=-1) * dk ** -0.5
        k = F.normalize(k.view(B, H, dk), dim=-1)
        v = v.view(B, H, dv)
        a = torch.exp(-A * F.softplus(xt @ W["a_proj"].T + dt_bias))[..., None, None]
        b = torch.sigmoid(xt @ W["b_proj"].T)[..., None, None]
        erase = torch.eye(dk, dtype=torch.float64) - b * k[..., :, None] * k[..., None, :]
        S = a * (erase @ S) + b * k[..., :, None] * v[..., None, :]
        o = rms_norm_reference(torch.einsum("bhi,bhij->bhj", q, S), norm_w, config.norm_eps)
        gate = F.silu(xt @ W["g_proj"].T)
        outs.append((o.reshape(B, H * dv) * gate) @ W["out_proj"].T)
    return torch.stack(outs, dim=1)


def test_module_matches_hand_written_reference():
    config, module = _module(seed=1)
    x = torch.randn(2, 21, config.dim, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = module(x, cpu_step(0, 21))
    assert y.shape == (2, 21, config.dim)
    torch.testing.assert_close(y, _reference_module(module, x, config).float(), atol=2e-5, rtol=1e-4)


def test_module_full_equals_chunked_and_token_by_token():
    config, module = _module(seed=2, deltanet_chunk=4)  # pieces of 3/5/7 never align with the chunk
    x = torch.randn(2, 30, config.dim, generator=torch.Generator().manual_seed(12))
    # a piece shorter than the convolution's memory among them
    full, pieces, tokens, piece_cache, token_cache = run_in_pieces(module, x, (3, 5, 1, 7, 2, 12))
    assert isinstance(piece_cache, DeltaNetState)
    torch.testing.assert_close(pieces, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(token_cache.state, piece_cache.state, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(token_cache.conv, piece_cache.conv)


def test_left_padding_leaves_the_state_and_convolution_untouched():
    config, module = _module(seed=6, deltanet_chunk=4)
    T, p = 9, 3
    x = torch.randn(2, T, config.dim, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        padded_cache = module.new_cache(2, dtype=torch.float32, device="cpu")
        y = module(x, cpu_step(0, T, torch.tensor([0, p])), padded_cache)
        alone_cache = module.new_cache(1, dtype=torch.float32, device="cpu")
        alone = module(x[1:, p:], cpu_step(0, T - p), alone_cache)
    torch.testing.assert_close(y[1:, p:], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(padded_cache.state[1:], alone_cache.state, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(padded_cache.conv[1:], alone_cache.conv)


def test_bf16_keeps_an_fp32_state():
    config, module = _module(seed=4)
    x = torch.randn(2, 5, config.dim).bfloat16()
    full, pieces, _, cache, _ = run_in_pieces(module.to(torch.bfloat16), x, (4, 1))
    assert full.dtype == pieces.dtype == torch.bfloat16
    assert cache.state.dtype == torch.float32 and cache.conv.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_are_constant_and_stated_by_the_mixer(dtype):
    config, module = _module(seed=5)
    H, dk = config.n_deltanet_heads, config.deltanet_key_dim
    cache = module.new_cache(3, dtype=dtype, device="cpu")
    channels = H * (dk + dk + 2 * dk)
    expected = 3 * (H * dk * 2 * dk * 4 + (config.deltanet_conv - 1) * channels * dtype.itemsize)
    assert cache.nbytes() == expected
    for context in (1, 4096, 1 << 20):
        assert 3 * GatedDeltaNet.cache_bytes_per_row(config, context, dtype) == expected


def test_key_width_and_heads_from_the_config():
    config = get_config("yoco-gdn", "40m")
    assert (config.n_deltanet_heads, config.deltanet_key_dim) == (3, 128)
    assert get_config("yoco-gdn", "tiny", deltanet_heads=None).n_deltanet_heads == 1  # 48 keys < 128
