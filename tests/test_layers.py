"""RMSNorm, RoPE and SwiGLU against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from harness import rms_norm_reference

from yoco import layers
from yoco.layers import NoRotation, QueryTemperature, RMSNorm, RopeExtension, RotaryEmbedding, Step, SwiGLU, rotate_by


# ---------------------------------------------------------------------- RMSNorm
def test_rmsnorm_matches_formula_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_reference(x, norm.weight, 1e-5).float(), atol=1e-6, rtol=1e-5)


def test_rmsnorm_eps_matters():
    x = torch.full((1, 4), 1e-3)
    y = RMSNorm(4, eps=1e-5)(x)
    # by hand: 1e-3 / sqrt(1e-6 + 1e-5)
    expected = 1e-3 / math.sqrt(1e-6 + 1e-5)
    torch.testing.assert_close(y, torch.full((1, 4), expected), atol=0, rtol=1e-5)


def test_rmsnorm_non_affine():
    torch.manual_seed(1)
    norm = RMSNorm(8, eps=1e-6, affine=False)
    assert norm.weight is None
    assert list(norm.parameters()) == []
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, None, 1e-6).float(), atol=1e-6, rtol=1e-5)


def test_rmsnorm_bf16_is_computed_in_fp32():
    torch.manual_seed(2)
    dim = 256
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    # large, spread-out values: a bf16 mean of squares would lose digits
    x = (torch.randn(4, dim) * 30 + 7).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    expected = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).bfloat16()
    # the fp32 computation cast to bf16, bit for bit
    assert torch.equal(y, expected)
    # whereas a bf16-only computation differs visibly
    xb = x
    bf16_only = xb / torch.sqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.bfloat16()
    assert not torch.equal(bf16_only, y)


# ---------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("d", [4, 8, 32])
def test_rope_standard_frequencies(d):
    theta = 10000.0
    rope = RotaryEmbedding(d, theta, "standard", "half")
    expected = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float32)
    assert rope.inv_freq.shape == (d // 2,)
    torch.testing.assert_close(rope.inv_freq, expected, atol=0, rtol=1e-6)
    assert rope.inv_freq[0].item() == 1.0


@pytest.mark.parametrize("d", [4, 8, 32])
def test_rope_linspace_frequencies(d):
    theta = 500.0
    rope = RotaryEmbedding(d, theta, "linspace", "interleaved")
    expected = theta ** -torch.linspace(0, 1, d // 2, dtype=torch.float64)
    torch.testing.assert_close(rope.inv_freq, expected.float(), atol=0, rtol=1e-6)
    # endpoints: 1 and 1/theta
    assert rope.inv_freq[0].item() == 1.0
    assert rope.inv_freq[-1].item() == pytest.approx(1 / theta, rel=1e-6)


def test_rope_bad_arguments():
    with pytest.raises(ValueError):
        RotaryEmbedding(7)
    with pytest.raises(ValueError):
        RotaryEmbedding(8, freqs="ntk")
    with pytest.raises(ValueError):
        RotaryEmbedding(8, pairs="diag")


def test_rope_tables_shape_and_values():
    rope = RotaryEmbedding(8, 100.0)
    pos = torch.arange(5)
    cos, sin = rope.tables(pos)
    assert cos.shape == (5, 1, 4) and sin.shape == (5, 1, 4)
    assert cos.dtype == torch.float32
    ang = pos.double()[:, None] * rope.inv_freq.double()[None]
    torch.testing.assert_close(cos[:, 0], ang.cos().float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[:, 0], ang.sin().float(), atol=1e-7, rtol=0)
    cos_b, _ = rope.tables(torch.arange(6).view(2, 3))
    assert cos_b.shape == (2, 3, 1, 4)


def _naive_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, pairs: str) -> torch.Tensor:
    B, T, H, d = x.shape
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for i in range(half):
                    a = float(positions[t]) * float(inv_freq[i])
                    c, s = math.cos(a), math.sin(a)
                    if pairs == "half":
                        i1, i2 = i, i + half
                    else:
                        i1, i2 = 2 * i, 2 * i + 1
                    x1, x2 = xd[b, t, h, i1].item(), xd[b, t, h, i2].item()
                    out[b, t, h, i1] = x1 * c - x2 * s
                    out[b, t, h, i2] = x1 * s + x2 * c
    return out


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
@pytest.mark.parametrize("freqs", ["standard", "linspace"])
def test_rope_matches_naive_rotation(pairs, freqs):
    torch.manual_seed(3)
    B, T, H, d = 2, 5, 2, 8
    rope = RotaryEmbedding(d, 10000.0, freqs, pairs)
    x = torch.randn(B, T, H, d)
    positions = torch.tensor([0, 1, 2, 7, 31])
    cos, sin = rope.tables(positions)
    y = rope.apply(x, cos, sin)
    expected = _naive_rope(x, positions, rope.inv_freq, pairs)
    torch.testing.assert_close(y, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
def test_rope_of_strided_views_equals_rope_of_their_copies(pairs):
    # apply takes each pair as one complex number: views whose pairs are not adjacent and aligned (an odd
    # offset, heads moved to the front) must rotate as their dense copies do, in fp32 and bf16
    torch.manual_seed(7)
    rope = RotaryEmbedding(8, 10000.0, "standard", pairs)
    cos, sin = rope.tables(torch.arange(3, 8))
    for x in (torch.randn(2, 5, 3, 9)[..., 1:], torch.randn(2, 3, 5, 8).transpose(1, 2),
              torch.randn(2, 5, 3, 8).to(torch.bfloat16)):
        torch.testing.assert_close(rope.apply(x, cos, sin), rope.apply(x.contiguous(), cos, sin), atol=1e-6, rtol=1e-6)
        expected = _naive_rope(x.float(), torch.arange(3, 8), rope.inv_freq, pairs).to(x.dtype)
        torch.testing.assert_close(rope.apply(x, cos, sin), expected, atol=1e-5 if x.dtype == torch.float32 else 2e-2,
                                   rtol=1e-5 if x.dtype == torch.float32 else 2e-2)


def test_rope_half_and_interleaved_differ():
    torch.manual_seed(4)
    x = torch.randn(1, 3, 1, 8)
    cos, sin = RotaryEmbedding(8).tables(torch.arange(3) + 1)
    a = RotaryEmbedding(8, pairs="half").apply(x, cos, sin)
    b = RotaryEmbedding(8, pairs="interleaved").apply(x, cos, sin)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
def test_rope_preserves_pair_norms(pairs):
    torch.manual_seed(5)
    d = 16
    rope = RotaryEmbedding(d, 10000.0, "standard", pairs)
    x = torch.randn(2, 9, 3, d)
    cos, sin = rope.tables(torch.arange(100, 109))
    y = rope.apply(x, cos, sin)

    def pair_norms(t):
        if pairs == "half":
            a, b = t.chunk(2, dim=-1)
        else:
            a, b = t[..., 0::2], t[..., 1::2]
        return (a * a + b * b).sqrt()

    torch.testing.assert_close(pair_norms(y), pair_norms(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
@pytest.mark.parametrize("freqs", ["standard", "linspace"])
def test_rope_relative_position_property(pairs, freqs):
    torch.manual_seed(6)
    d = 16
    rope = RotaryEmbedding(d, 10000.0, freqs, pairs)
    q = torch.randn(1, 1, 2, d)
    k = torch.randn(1, 1, 2, d)

    def rot(x, p):
        cos, sin = rope.tables(torch.tensor([p]))
        return rope.apply(x, cos, sin)

    def dot(m, n):
        return (rot(q, m) * rot(k, n)).sum(-1).double()

    # same offset m - n = 3 at different absolute positions
    torch.testing.assert_close(dot(5, 2), dot(45, 42), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dot(3, 0), dot(1003, 1000), atol=1e-4, rtol=1e-4)
    # same offset -4
    torch.testing.assert_close(dot(0, 4), dot(20, 24), atol=1e-4, rtol=1e-4)
    # and a different offset gives a different score
    assert (dot(5, 2) - dot(5, 3)).abs().max() > 1e-3


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
def test_rope_position_zero_is_identity(pairs):
    torch.manual_seed(7)
    rope = RotaryEmbedding(8, 10000.0, "linspace", pairs)
    x = torch.randn(2, 1, 3, 8)
    cos, sin = rope.tables(torch.zeros(1, dtype=torch.long))
    assert torch.equal(rope.apply(x, cos, sin), x)


def test_rope_keeps_dtype():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 4, 2, 8).bfloat16()
    cos, sin = rope.tables(torch.arange(4))
    y = rope.apply(x, cos, sin)
    assert y.dtype == torch.bfloat16
    ref = rope.apply(x.float(), cos, sin).bfloat16()
    assert torch.equal(y, ref)


def test_rope_batched_positions_broadcast():
    torch.manual_seed(8)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 2, 8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = rope.tables(pos)
    y = rope.apply(x, cos, sin)
    for b in range(2):
        cb, sb = rope.tables(pos[b])
        torch.testing.assert_close(y[b:b + 1], rope.apply(x[b:b + 1], cb, sb), atol=0, rtol=0)


# ---------------------------------------------------------------------- SwiGLU
def test_swiglu_matches_hand_computation():
    torch.manual_seed(9)
    mlp = SwiGLU(12, 20)
    x = torch.randn(2, 3, 12)
    g = x @ mlp.gate_proj.weight.T
    u = x @ mlp.up_proj.weight.T
    expected = (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
    # without autograd it works in place (on its own temporaries only): the same values, x untouched
    before = x.clone()
    with torch.inference_mode():
        assert mlp(x).equal(mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    assert x.equal(before)
    x.requires_grad_(True)  # with it, gradients flow as through the formula
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    (want,) = torch.autograd.grad(((g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T).sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)
    assert mlp.gate_proj.bias is None and mlp.up_proj.bias is None and mlp.down_proj.bias is None
    assert mlp.gate_proj.weight.shape == (20, 12) and mlp.down_proj.weight.shape == (12, 20)


# ---------------------------------------------------------------------- Step
def test_step_slots_positions_and_pad_mask():
    cpu = torch.device("cpu")
    s = Step(3, 4, None, cpu)
    assert s.slots.tolist() == [3, 4, 5, 6]
    assert s.positions.tolist() == [3, 4, 5, 6]
    assert s.pad_mask() is None
    p = Step(0, 4, torch.tensor([0, 2]), cpu)
    assert p.positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert p.pad_mask().tolist() == [[False] * 4, [True, True, False, False]]
    last = p.last(1)
    assert (last.start, last.length) == (3, 1)
    assert last.positions.tolist() == [[3], [1]]


# ---------------------------------------------------------------------- position options of the global attention
def _frequencies(freqs="standard", extension=None, d=32, theta=10000.0):
    return RotaryEmbedding(d, theta, freqs, extension=extension).inv_freq.double()


@pytest.mark.parametrize("freqs", ["standard", "linspace"])
def test_position_interpolation_divides_every_frequency(freqs):
    torch.testing.assert_close(_frequencies(freqs, RopeExtension("pi", 4.0)), _frequencies(freqs) / 4, rtol=1e-6, atol=0)


def test_ntk_aware_raises_the_base_as_the_formula_says():
    d, s = 32, 8.0
    # the standard frequencies: theta' = theta * s^(d / (d - 2))
    torch.testing.assert_close(_frequencies("standard", RopeExtension("ntk", s), d),
                               _frequencies("standard", None, d, 10000.0 * s ** (d / (d - 2))), rtol=1e-6, atol=0)


@pytest.mark.parametrize("freqs", ["standard", "linspace"])
def test_ntk_aware_keeps_the_fastest_frequency_and_divides_the_slowest(freqs):
    plain, ntk = _frequencies(freqs), _frequencies(freqs, RopeExtension("ntk", 8.0))
    assert ntk[0] == plain[0]
    torch.testing.assert_close(ntk[-1], plain[-1] / 8, rtol=1e-6, atol=0)
    assert bool((ntk <= plain).all())


def test_yarn_keeps_fast_frequencies_interpolates_slow_ones_and_ramps_between():
    L, s = 1024, 16.0
    plain, yarn = _frequencies("standard", d=64), _frequencies("standard", RopeExtension("yarn", s, L), d=64)
    turns = L * plain / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(yarn[fast], plain[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(yarn[slow], plain[slow] / s, rtol=1e-6, atol=0)
    between = ~fast & ~slow
    kept = (turns[between] - 1) / 31
    torch.testing.assert_close(yarn[between], plain[between] / s * (1 - kept) + plain[between] * kept, rtol=1e-5, atol=0)


def test_yarn_scales_the_logits_by_its_attention_factor_squared():
    rotary = RotaryEmbedding(16, extension=RopeExtension("yarn", 16.0, 64))
    factor = 0.1 * math.log(16.0) + 1
    assert rotary.extension.attention_factor == pytest.approx(factor)
    x = torch.randn(1, 5, 2, 16)
    step = Step(3, 5, None, torch.device("cpu"))
    q, k = rotary.queries(x, step), rotary.keys(x, step)
    torch.testing.assert_close(q.norm(dim=-1), x.norm(dim=-1) * factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, q)
    # re-rotating cached keys (a compressed cache moving them) turns them, never scales them again
    moved = rotate_by(rotary, k.transpose(1, 2), torch.tensor([7]))
    torch.testing.assert_close(moved.norm(dim=-1), k.transpose(1, 2).norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_the_llama4_temperature_by_hand():
    t = QueryTemperature("llama4", scale=0.1, floor_scale=8)
    got = t.factor(torch.tensor([0, 6, 7, 15, 23, 63]))
    # 1 + 0.1 * log(floor((p + 1) / 8) + 1)
    want = [1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3), 1 + 0.1 * math.log(4), 1 + 0.1 * math.log(9)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_the_log_temperature_by_hand():
    t = QueryTemperature("log", train_len=16)
    got = t.factor(torch.tensor([0, 15, 255, 4095]))  # n = p + 1: 1, 16, 256, 4096
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float64))


def test_query_temperature_multiplies_queries_only_per_position_and_row():
    rotary = RotaryEmbedding(8, temperature=QueryTemperature("log", train_len=4))
    x = torch.randn(2, 3, 1, 8)
    step = Step(14, 3, torch.tensor([0, 12]), torch.device("cpu"))  # row 1 left-padded: positions 2..4
    q, k = rotary.queries(x, step), rotary.keys(x, step)
    factors = QueryTemperature("log", train_len=4).factor(step.positions).float()  # [2, 3]
    torch.testing.assert_close(q, k * factors[..., None, None])
    assert factors[1, 0] == 1.0 and factors[0, 2] > 1.0


def test_nope_rotates_nothing_and_keeps_its_temperature():
    nope = NoRotation(8, temperature=QueryTemperature("llama4", floor_scale=2))
    x = torch.randn(1, 4, 2, 8)
    step = Step(5, 4, None, torch.device("cpu"))
    assert torch.equal(nope.keys(x, step), x)
    factors = nope.temperature.factor(step.positions).float()
    torch.testing.assert_close(nope.queries(x, step), x * factors[:, None, None])
    keys = x.transpose(1, 2)
    assert torch.equal(rotate_by(nope, keys, torch.tensor([3])), keys)


# ---------------------------------------------------------------------- Linear
@pytest.mark.parametrize("bf16_arithmetic", [False, True])
@pytest.mark.parametrize("rows", [1, 15, 16, 300])
def test_linear_in_bf16_multiplies_in_fp32_for_many_rows_where_the_cpu_lacks_bf16(rows, bf16_arithmetic, monkeypatch):
    monkeypatch.setattr(layers, "CPU_BF16_ARITHMETIC", bf16_arithmetic)
    torch.manual_seed(rows)
    linear = layers.Linear(64, 48, bias=True).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    wide = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    plain = torch.nn.functional.linear(x, linear.weight, linear.bias)
    expected = wide if rows >= layers.FP32_COMPUTE_ROWS and not bf16_arithmetic else plain
    assert linear(x).equal(expected)
    # fp32: exactly nn.Linear
    linear32, x32 = linear.float(), x.float()
    assert linear32(x32).equal(torch.nn.functional.linear(x32, linear32.weight, linear32.bias))
    assert isinstance(linear, torch.nn.Linear) and set(linear.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("bf16_arithmetic", [False, True])
@pytest.mark.parametrize("rows", [1, 300])
def test_linear_under_bf16_autocast_is_autocasts_product_computed_in_fp32_where_the_cpu_lacks_bf16(
        rows, bf16_arithmetic, monkeypatch):
    monkeypatch.setattr(layers, "CPU_BF16_ARITHMETIC", bf16_arithmetic)
    torch.manual_seed(rows)
    linear = layers.Linear(64, 48, bias=True)  # fp32 weights, as autocast training keeps them
    x = torch.randn(rows, 64, requires_grad=True)

    def run(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        grads = torch.autograd.grad(y.float().square().sum(), (x, linear.weight, linear.bias))
        return y, grads

    y, grads = run(linear)
    y_autocast, grads_autocast = run(lambda x: torch.nn.Linear.forward(linear, x))
    assert y.dtype == y_autocast.dtype == torch.bfloat16
    if rows >= layers.FP32_COMPUTE_ROWS and not bf16_arithmetic:
        # the operands rounded to bf16 as autocast rounds them, multiplied exactly and accumulated in fp32
        bf = layers.rounded_to_bf16
        exact = torch.nn.functional.linear(bf(x.detach()), bf(linear.weight.detach()), bf(linear.bias.detach()))
        assert y.equal(exact.bfloat16())
        # autocast's own result differs by its summation order only: within one bf16 rounding
        torch.testing.assert_close(y.float(), y_autocast.float(), rtol=2 ** -7, atol=1e-6)
        for g, g_autocast in zip(grads, grads_autocast):
            torch.testing.assert_close(g, g_autocast, rtol=2 ** -6, atol=2e-2 * g_autocast.abs().max().item())
    else:
        assert y.equal(y_autocast) and all(g.equal(h) for g, h in zip(grads, grads_autocast))
