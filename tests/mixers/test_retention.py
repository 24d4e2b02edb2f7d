"""Gated retention: parallel / chunkwise / recurrent agreement, state carrying, and the module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import cpu_step, run_in_pieces

from yoco.config import get_config
from yoco.layers import RotaryEmbedding
from yoco.mixers.retention import (
    GatedRetention,
    RetentionState,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)


ATOL = 1e-5


def _inputs(B=2, H=2, T=37, dk=8, dv=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dk, generator=g)
    k = torch.randn(B, H, T, dk, generator=g) * dk ** -0.5
    v = torch.randn(B, H, T, dv, generator=g)
    log_decay = F.logsigmoid(torch.randn(B, H, T, generator=g)) / 16
    return q.to(dtype), k.to(dtype), v.to(dtype), log_decay


def _naive(q, k, v, log_decay, state=None):
    """Double-precision loop over S_t = gamma_t S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    q, k, v, g = q.double(), k.double(), v.double(), log_decay.double().exp()
    B, H, T, dk = q.shape
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64) if state is None else state.double()
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = g[:, :, t, None, None] * S + torch.einsum("bhi,bhj->bhij", k[:, :, t], v[:, :, t])
        out[:, :, t] = torch.einsum("bhi,bhij->bhj", q[:, :, t], S)
    return out, S


def test_three_forms_agree_with_naive_loop():
    q, k, v, ld = _inputs()
    ref, ref_state = _naive(q, k, v, ld)
    par = retention_parallel(q, k, v, ld)
    rec, rec_state = retention_recurrent(q, k, v, ld)
    assert par.shape == (2, 2, 37, 8) and par.dtype == torch.float32
    torch.testing.assert_close(par, ref.float(), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(rec, ref.float(), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(rec_state, ref_state.float(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 8, 16, 37, 64])
def test_chunkwise_matches_parallel_and_recurrent(chunk):
    q, k, v, ld = _inputs()
    par = retention_parallel(q, k, v, ld)
    rec, rec_state = retention_recurrent(q, k, v, ld)
    out, state = retention_chunkwise(q, k, v, ld, chunk)
    assert out.shape == par.shape
    torch.testing.assert_close(out, par, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out, rec, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state, rec_state, atol=ATOL, rtol=1e-5)
    assert state.dtype == torch.float32 and state.shape == (2, 2, 8, 8)


def test_different_dk_dv():
    q, k, v, ld = _inputs(B=1, H=3, T=11, dk=4, dv=6, seed=3)
    ref, ref_state = _naive(q, k, v, ld)
    out, state = retention_chunkwise(q, k, v, ld, 3)
    torch.testing.assert_close(out, ref.float(), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state, ref_state.float(), atol=ATOL, rtol=1e-5)


def test_decay_actually_matters():
    # guard against a test that would pass with the decay ignored
    q, k, v, ld = _inputs(seed=4)
    with_decay = retention_parallel(q, k, v, ld)
    without = retention_parallel(q, k, v, torch.zeros_like(ld))
    assert (with_decay - without).abs().max() > 1e-2


@pytest.mark.parametrize("T1,chunk", [(1, 4), (10, 4), (13, 5), (20, 64), (36, 8)])
def test_chunkwise_state_carry_split(T1, chunk):
    q, k, v, ld = _inputs(seed=1)
    init = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(9))
    whole, whole_state = retention_chunkwise(q, k, v, ld, chunk, init.clone())
    o1, s1 = retention_chunkwise(q[:, :, :T1], k[:, :, :T1], v[:, :, :T1], ld[:, :, :T1], chunk, init.clone())
    o2, s2 = retention_chunkwise(q[:, :, T1:], k[:, :, T1:], v[:, :, T1:], ld[:, :, T1:], chunk, s1)
    split = torch.cat((o1, o2), dim=2)
    torch.testing.assert_close(split, whole, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s2, whole_state, atol=ATOL, rtol=1e-5)
    rec, rec_state = retention_recurrent(q, k, v, ld, init.clone())
    torch.testing.assert_close(whole, rec, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(whole_state, rec_state, atol=ATOL, rtol=1e-5)
    ref, ref_state = _naive(q, k, v, ld, init)
    torch.testing.assert_close(whole, ref.float(), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(whole_state, ref_state.float(), atol=ATOL, rtol=1e-5)


def test_chunkwise_with_and_without_autograd_agree():
    # The state is carried across chunks two ways: stacked (autograd differentiates it) and in place
    # (no autograd): the same outputs, and the first's gradients are the recurrent form's.
    q, k, v, ld = _inputs(seed=5)
    init = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain, plain_state = retention_chunkwise(q, k, v, ld, 5, init)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ld, init)]
    out, state = retention_chunkwise(*leaves[:4], 5, leaves[4])
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state, plain_state, atol=ATOL, rtol=1e-5)
    (out.square().sum() + state.sum()).backward()
    references = [t.clone().requires_grad_() for t in (q, k, v, ld, init)]
    ref, ref_state = retention_recurrent(*references[:4], references[4])
    (ref.square().sum() + ref_state.sum()).backward()
    for leaf, reference in zip(leaves, references):
        torch.testing.assert_close(leaf.grad, reference.grad, atol=1e-4, rtol=1e-4)


def test_initial_state_contributes():
    q, k, v, ld = _inputs(seed=2, T=5)
    init = torch.ones(2, 2, 8, 8)
    a, _ = retention_chunkwise(q, k, v, ld, 4, init)
    b, _ = retention_chunkwise(q, k, v, ld, 4, None)
    # the difference is exactly the decayed initial state read by q: q_t * exp(cum_t) @ S0
    expected = (q * ld.cumsum(-1).exp()[..., None]) @ init
    torch.testing.assert_close(a - b, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_state_is_fp32_for_bf16_inputs(form):
    q, k, v, ld = _inputs(dtype=torch.bfloat16, T=9)
    if form == "chunkwise":
        out, state = retention_chunkwise(q, k, v, ld, 4)
    else:
        out, state = retention_recurrent(q, k, v, ld)
    assert state.dtype == torch.float32
    assert out.dtype == torch.float32
    ref, ref_state = _naive(q.float(), k.float(), v.float(), ld)
    torch.testing.assert_close(state, ref_state.float(), atol=1e-4, rtol=1e-4)
    # carrying the fp32 state into a second bf16 call keeps it fp32
    if form == "chunkwise":
        _, state2 = retention_chunkwise(q, k, v, ld, 4, state)
    else:
        _, state2 = retention_recurrent(q, k, v, ld, state)
    assert state2.dtype == torch.float32
    assert retention_parallel(q, k, v, ld).dtype == torch.float32


# ---------------------------------------------------------------------- the module
def _module(seed=0, chunk=None):
    overrides = {} if chunk is None else {"retention_chunk": chunk}
    config = get_config("yoco-gret", "tiny", **overrides)
    torch.manual_seed(seed)
    head_dim = config.dim // config.n_retention_heads
    rotary = RotaryEmbedding(head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs)
    module = GatedRetention(config, rotary).eval()
    return config, module


def _reference_module(module: GatedRetention, x: torch.Tensor, config) -> torch.Tensor:
    """The reference formula written out by hand, token by token in float64."""
    B, T, D = x.shape
    H = config.n_retention_heads
    d = D // H
    xd = x.double()
    W = {n: getattr(module, n).weight.detach().double() for n in
         ("q_proj", "k_proj", "v_proj", "g_proj", "gt_proj", "out_proj")}
    # RoPE ("linspace" freqs, "interleaved" pairs for yoco-gret), in float64
    assert (config.rope_freqs, config.rope_pairs) == ("linspace", "interleaved")
    inv_freq = config.rope_theta ** -torch.linspace(0, 1, d // 2, dtype=torch.float64)

    def rope(t, pos):  # t [B, H, d]
        a = pos * inv_freq
        c, s = a.cos(), a.sin()
        x1, x2 = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x1 * s + x2 * c
        return out

    S = torch.zeros(B, H, d, d, dtype=torch.float64)
    outs = []
    for t in range(T):
        xt = xd[:, t]
        q = rope((xt @ W["q_proj"].T).view(B, H, d), t)
        k = rope((xt @ W["k_proj"].T).view(B, H, d), t) * d ** -0.5
        v = (xt @ W["v_proj"].T).view(B, H, d)
        gamma = torch.exp(F.logsigmoid(xt @ W["gt_proj"].T) / 16)  # [B, H]
        S = gamma[:, :, None, None] * S + k[:, :, :, None] * v[:, :, None, :]
        o = torch.einsum("bhi,bhij->bhj", q, S)
        o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + config.norm_eps)
        g = xt @ W["g_proj"].T
        outs.append((F.silu(g) * o.reshape(B, D)) @ W["out_proj"].T)
    return torch.stack(outs, dim=1)


def test_module_matches_hand_written_reference():
    config, module = _module(seed=1)
    x = torch.randn(2, 21, config.dim, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = module(x, cpu_step(0, 21))
    ref = _reference_module(module, x, config)
    assert y.shape == (2, 21, config.dim)
    torch.testing.assert_close(y, ref.float(), atol=2e-5, rtol=1e-4)


def test_module_full_equals_chunked_and_token_by_token():
    config, module = _module(seed=2, chunk=4)  # chunk 4 so that 3/5/7 don't align with it
    x = torch.randn(2, 30, config.dim, generator=torch.Generator().manual_seed(12))
    full, chunked, stepwise, chunked_cache, stepwise_cache = run_in_pieces(module, x, (3, 5, 1, 7, 2, 12))
    assert isinstance(chunked_cache, RetentionState)
    torch.testing.assert_close(chunked, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stepwise, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stepwise_cache.state, chunked_cache.state, atol=2e-5, rtol=1e-4)
    assert stepwise_cache.state.dtype == torch.float32


def test_module_default_chunk_full_equals_stepwise():
    config, module = _module(seed=3)  # tiny preset chunk (16); T=37 crosses it twice, tail partial
    B, T = 1, 37
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = module(x, cpu_step(0, T))
        cache = module.new_cache(B, dtype=torch.float32, device="cpu")
        stepwise = torch.cat([module(x[:, t:t + 1], cpu_step(t, 1), cache) for t in range(T)], dim=1)
    torch.testing.assert_close(stepwise, full, atol=2e-5, rtol=1e-4)


def test_module_left_padding_matches_unpadded_row():
    config, module = _module(seed=6, chunk=4)
    T, p = 9, 3
    x = torch.randn(2, T, config.dim, generator=torch.Generator().manual_seed(14))
    pad = torch.tensor([0, p])
    with torch.no_grad():
        y = module(x, cpu_step(0, T, pad))
        alone = module(x[1:, p:], cpu_step(0, T - p))
        row0 = module(x[:1], cpu_step(0, T))
    torch.testing.assert_close(y[1:, p:], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y[:1], row0, atol=2e-5, rtol=1e-4)


def test_module_bf16_keeps_fp32_state():
    config, module = _module(seed=4)
    x = torch.randn(2, 5, config.dim).bfloat16()
    full, pieces, _, cache, _ = run_in_pieces(module.to(torch.bfloat16), x, (4, 1))
    assert full.dtype == pieces.dtype == torch.bfloat16
    assert cache.state.dtype == torch.float32


def test_retention_state_nbytes_constant():
    config, module = _module(seed=5)
    B = 3
    H, d = config.n_retention_heads, config.dim // config.n_retention_heads
    cache = module.new_cache(B, dtype=torch.float32, device="cpu")
    expected = B * H * d * d * 4
    assert cache.nbytes() == expected
    assert cache.state.shape == (B, H, d, d)
    with torch.no_grad():
        module(torch.randn(B, 20, config.dim), cpu_step(0, 20), cache)
        assert cache.nbytes() == expected
        module(torch.randn(B, 1, config.dim), cpu_step(20, 1), cache)
        assert cache.nbytes() == expected
        module(torch.randn(B, 50, config.dim), cpu_step(21, 50), cache)
    assert cache.nbytes() == expected
    # a bf16 cache request still stores an fp32 state of the same size
    assert module.new_cache(B, dtype=torch.bfloat16, device="cpu").nbytes() == expected
