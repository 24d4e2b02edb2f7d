"""Quantized K/V caches (KIVI): codes, packing, the error bound, the residual, bytes == formula, and
cached logits against full precision for every architecture with a growing cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import ARCH_VARIANTS, cpu_step, engine_logits, make_model, naive_attention

from yoco.cache import KVGeometry
from yoco.engine import left_pad
from yoco.quantize import (KVQuantization, QuantizationError, QuantizedKV, as_quantization, dequantize, pack,
                           quantize, unpack)

BITS = (8, 4, 2)
TINY = dict(group=8, residual=16)  # the tiny preset's heads are 16 wide: groups of 8 channels


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    if bits == 4:  # the first code in the low bits
        assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21


@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_the_written_out_rule_and_its_error_bound(bits):
    x = torch.randn(4, 6, 32, dtype=torch.float64) * torch.linspace(0.1, 5, 32, dtype=torch.float64)
    codes, scale, zero = quantize(x, bits, dim=1)  # one scale per (slice, channel) over 6 entries
    levels = 2 ** bits - 1
    for i, c in itertools.product(range(4), range(32)):
        column = x[i, :, c].float()
        low, high = column.min(), column.max()
        step = (high - low) / levels
        assert torch.isclose(scale[i, 0, c], step) and zero[i, 0, c] == low
        assert torch.equal(codes[i, :, c], ((column - low) / step).round().clamp(0, levels).to(torch.uint8))
    error = (dequantize(codes, scale, zero, torch.float64) - x).abs()
    bound = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (2 * levels)
    assert (error <= bound * (1 + 1e-5) + 1e-6).all()
    constant = torch.full((2, 8), 3.25)
    assert torch.equal(dequantize(*quantize(constant, bits, dim=1), torch.float32), constant)


def test_bad_settings_are_refused_with_a_message():
    for bad, message in (((3,), "kv bits must be one of 2, 4, 8"), ((4, 0), "group size must be >= 1"),
                         ((4, 32, -1), "residual must be >= 0")):
        with pytest.raises(QuantizationError, match=message):
            KVQuantization(*bad)
    with pytest.raises(QuantizationError, match="group size 32 must divide the value dim 16"):
        KVQuantization(4).check(KVGeometry(2, 16, 16))
    with pytest.raises(QuantizationError, match="the kv group size 2 is not a multiple of 4"):
        KVQuantization(2, group=2).check(KVGeometry(2, 8, 8))
    with pytest.raises(QuantizationError, match="the value dim 6 is not a multiple of 4"):
        KVQuantization(2, group=4).check(KVGeometry(2, 8, 6))
    with pytest.raises(QuantizationError, match="kv_bits must be an int"):
        as_quantization("4")
    assert as_quantization(4) == KVQuantization(4, 32, 128) and as_quantization(None) is None
    with pytest.raises(QuantizationError, match="group size 32 must divide the value dim 16"):
        make_model("transformer").new_cache(1, kv_bits=4)  # the tiny preset's heads are 16 wide


def _kv(T, seed, h=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, h, T, d, generator=g), torch.randn(1, h, T, d, generator=g)


@pytest.mark.parametrize("bits", BITS)
def test_residual_holds_the_latest_tokens_bit_exact_and_folds_group_by_group(bits):
    q = KVQuantization(bits, group=8, residual=16)
    cache = QuantizedKV(KVGeometry(2, 16, 16), q, 1, dtype=torch.float32, capacity=100)
    k, v = _kv(61, seed=bits)
    for start, end in ((0, 10), (10, 23), (23, 24), (24, 61)):
        cache.append(k[:, :, start:end], v[:, :, start:end])
        held = cache.held[0]
        assert 16 <= held < 24 or end < 24  # R..R+G-1 once long enough
        assert cache.quantized[0] + held == end and cache.quantized[0] % 8 == 0
        assert torch.equal(cache.residual_k[0, :, :held], k[0, :, end - held:end])
        assert torch.equal(cache.residual_v[0, :, :held], v[0, :, end - held:end])
    n = cache.quantized[0]
    keys, values = cache.dequantized(0, n)
    levels = 2 ** bits - 1
    for g in range(n // 8):  # keys per channel over 8 tokens, values per token over 8 channels
        block = k[0, :, 8 * g:8 * g + 8]
        bound = (block.amax(1) - block.amin(1)) / (2 * levels)
        assert ((keys[0, :, 8 * g:8 * g + 8] - block).abs() <= bound[:, None] + 1e-6).all()
    vg = v[0, :, :n].reshape(2, n, 2, 8)
    bound = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / (2 * levels)
    assert ((values[0].reshape(2, n, 2, 8) - vg).abs() <= bound + 1e-6).all()


def test_attend_equals_attention_over_dequantized_history_and_the_call_in_full_precision(monkeypatch):
    import yoco.quantize as quantize_module

    q_settings = KVQuantization(4, group=8, residual=16)
    geometry = KVGeometry(2, 16, 16)
    k, v = _kv(90, seed=3)
    queries = torch.randn(1, 4, 90, 16, generator=torch.Generator().manual_seed(4))
    outs = {}
    # read in one block, and 8 positions at a time; in two passes over every score, and block by block
    # merged by log-sum-exp: the same
    # (5 positions: blocks that cut the key groups of 8, which dequantize another way)
    for block, scores_bytes in ((4096, 1 << 26), (8, 1 << 26), (4096, 0), (8, 0), (5, 1 << 26), (5, 0)):
        monkeypatch.setattr(quantize_module, "READ_BLOCK", block)
        monkeypatch.setattr(quantize_module, "SCORES_BYTES", scores_bytes)
        cache = QuantizedKV(geometry, q_settings, 1, dtype=torch.float32, capacity=90)
        pieces, start = [], 0
        for n in (40, 1, 1, 30, 1, 17):
            cache.append(k[:, :, start:start + n], v[:, :, start:start + n])
            stored_k, stored_v = cache.dequantized(0, cache.quantized[0])
            history_k = torch.cat((stored_k, cache.residual_k[:, :, :cache.held[0]]), 2)[:, :, :start]
            history_v = torch.cat((stored_v, cache.residual_v[:, :, :cache.held[0]]), 2)[:, :, :start]
            keys = torch.cat((history_k, k[:, :, start:start + n]), 2)
            values = torch.cat((history_v, v[:, :, start:start + n]), 2)
            visible = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
            expected = naive_attention(queries[:, :, start:start + n], keys, values, visible).float()
            got = cache.attend(queries[:, :, start:start + n], cpu_step(start, n))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            pieces.append(got)
            start += n
        outs[block, scores_bytes] = torch.cat(pieces, 2)
    for key, out in outs.items():
        torch.testing.assert_close(out, outs[4096, 1 << 26], atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("last", [1, 3])
def test_the_last_queries_of_a_call_attend_as_in_the_whole_call(last):
    # YOCO's cross-decoder runs only for the positions that need logits: a call's last queries
    geometry, q_settings = KVGeometry(2, 16, 16), KVQuantization(4, group=8, residual=4)
    k, v = _kv(50, seed=5)
    queries = torch.randn(1, 4, 50, 16, generator=torch.Generator().manual_seed(6))
    whole, tail = (QuantizedKV(geometry, q_settings, 1, dtype=torch.float32) for _ in range(2))
    for cache in (whole, tail):
        cache.append(k[:, :, :20], v[:, :, :20])
        cache.attend(queries[:, :, :20], cpu_step(0, 20))
        cache.append(k[:, :, 20:], v[:, :, 20:])
    expected = whole.attend(queries[:, :, 20:], cpu_step(20, 30))[:, :, -last:]
    got = tail.attend(queries[:, :, 50 - last:], cpu_step(50 - last, last))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


GROWING = [name for name in ARCH_VARIANTS if name not in ("transformer-window", "block")]


@pytest.mark.parametrize("variant", GROWING)
@pytest.mark.parametrize("bits", BITS)
def test_bytes_equal_the_formula(variant, bits):
    model = make_model(variant)
    quantization = KVQuantization(bits, **TINY)
    for context in (5, 24, 25, 100, 1000):
        cache = model.new_cache(2, capacity=context, kv_bits=quantization)
        assert cache.nbytes() == model.cache_bytes_formula(2, context, torch.float32, kv_bits=quantization), context
    plain = model.cache_bytes_formula(1, 1000, torch.float32)
    assert model.cache_bytes_formula(1, 1000, torch.float32, kv_bits=quantization) < plain


def test_bytes_formula_written_out_for_one_kv_head_layout():
    # 2 heads of 64: 1000 positions, G 32, R 128 -> 864 quantized (27 groups), a 160-position residual
    geometry, q = KVGeometry(2, 64, 64), KVQuantization(4)
    codes = 2 * 864 * 64 * 4 // 8 * 2  # keys and values, 2 heads
    scales = 2 * 4 * (27 * 64 + 864 * 2) * 2  # scale + zero, float32; keys per group, values per token
    residual = 2 * 160 * 64 * 2 * 4
    assert QuantizedKV.bytes_per_row(geometry, q, 1000, torch.float32) == codes + scales + residual
    assert QuantizedKV(geometry, q, 1, dtype=torch.float32, capacity=1000).nbytes() == codes + scales + residual


@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "yoco-gret", "mla", "cla2", "mlkv"])
def test_eight_bit_logits_are_close_to_full_precision_and_two_bit_further(variant):
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(1))
    full = engine_logits(model, ids, 70, chunk=32)
    errors = {}
    for bits in BITS:
        cache_logits = engine_logits(model, ids, 70, 32, kv_bits=KVQuantization(bits, **TINY))
        errors[bits] = (cache_logits - full).abs().max().item()
    scale = full.std().item()
    assert errors[8] < 1e-3 * scale and errors[8] < errors[2], errors


@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "mla", "mla-decompressed"])
@pytest.mark.parametrize("two_pass", [True, False])
def test_left_padded_batch_equals_each_row_alone(variant, two_pass, monkeypatch):
    import yoco.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "SCORES_BYTES", 1 << 26 if two_pass else 0)
    model = make_model("mla") if variant == "mla-decompressed" else make_model(variant)
    if variant == "mla-decompressed":
        for module in model.modules():
            if hasattr(module, "absorb"):
                module.absorb = False
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (75, 50)]
    quantization = KVQuantization(4, **TINY)
    ids, pad = left_pad(prompts)
    follow = torch.randint(0, model.config.vocab_size, (2, 30), generator=g)
    batch = engine_logits(model, torch.cat((ids, follow), 1), ids.shape[1], 16, pad=pad, kv_bits=quantization)
    for row, prompt in enumerate(prompts):
        alone_ids = torch.cat((torch.tensor([prompt]), follow[row:row + 1]), 1)
        alone = engine_logits(model, alone_ids, len(prompt), 16, kv_bits=quantization)
        torch.testing.assert_close(batch[row], alone[0], atol=1e-4, rtol=1e-4)


def test_quantization_is_refused_where_no_cache_grows_and_beside_a_policy_that_evicts_while_decoding():
    from yoco.compress import H2O, StreamingLLM
    from yoco.models.base import InputError

    with pytest.raises(InputError, match="no growing K/V cache to quantize"):
        make_model("transformer-window").new_cache(1, kv_bits=KVQuantization(4, **TINY))
    with pytest.raises(InputError, match="Block Transformer's caches .* are not quantized"):
        make_model("block").new_cache(1, kv_bits=4)
    for policy in (H2O(budget=8), StreamingLLM(budget=8)):
        with pytest.raises(InputError, match="evicts while decoding; kv_bits composes with the policies that compress"):
            make_model("transformer").new_cache(1, kv_bits=KVQuantization(4, **TINY), compression=policy)


@pytest.mark.parametrize("variant", ["yoco-swa", "transformer", "mla"])
@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv"])
def test_a_prompt_policy_then_quantization_keeps_the_same_entries_quantized(variant, policy):
    from harness import POLICIES

    from yoco.engine import prefill

    model = make_model(variant)
    ids, pad = left_pad([list(range(3, 90)), list(range(10, 60))])
    quantization = KVQuantization(4, group=8, residual=4)
    with torch.no_grad():
        alone = model.new_cache(2, pad=pad, compression=POLICIES[policy](24))
        both = model.new_cache(2, pad=pad, compression=POLICIES[policy](24), kv_bits=quantization)
        for cache in (alone, both):
            prefill(model, ids, cache, 16)
    for kept, store in ((a, b) for a, b in zip(alone.layers, both.layers) if hasattr(a, "policy")):
        q = store.quantized
        n = q.quantized[0]
        assert q.quantized == [n, n] and n % 8 == 0 and n + q.held[0] == kept.entries  # every kept entry
        assert torch.equal(torch.cat((q.entry_slots[:, :, :n], q.residual_slots[:, :, :q.held[0]]), 2), kept.slots)
        assert torch.equal(q.residual_k[:, :, :q.held[0]], kept.k[:, :, n:])  # the residual in full precision
        keys, values = q.dequantized(0, n)
        step = (kept.k[:, :, :n].reshape(2, -1, n // 8, 8, kept.k.shape[-1]).amax(3)
                - kept.k[:, :, :n].reshape(2, -1, n // 8, 8, kept.k.shape[-1]).amin(3)) / 30
        error = (keys - kept.k[:, :, :n]).abs().reshape(step.shape[:3] + (8, -1))
        assert (error <= step[:, :, :, None] + 1e-6).all()  # keys per channel over 8 entries
        assert both.nbytes() < alone.nbytes()


@pytest.mark.parametrize("variant", ["yoco-swa", "transformer"])
def test_snapkv_then_quantized_padded_batch_equals_rows_alone_and_eight_bits_stay_close(variant):
    from harness import POLICIES

    model = make_model(variant)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (80, 45)]
    follow = torch.randint(0, model.config.vocab_size, (2, 20), generator=g)
    ids, pad = left_pad(prompts)
    snap = POLICIES["snapkv"]
    for bits in (8, 4):
        quantization = KVQuantization(bits, group=8, residual=4)
        batch = engine_logits(model, torch.cat((ids, follow), 1), ids.shape[1], 16, pad=pad, kv_bits=quantization,
                                        compression=snap(24))
        for row, prompt in enumerate(prompts):
            alone_ids = torch.cat((torch.tensor([prompt]), follow[row:row + 1]), 1)
            alone = engine_logits(model, alone_ids, len(prompt), 16, compression=snap(24), kv_bits=quantization)
            torch.testing.assert_close(batch[row], alone[0], atol=1e-4, rtol=1e-4)
            if bits == 8:
                plain = engine_logits(model, alone_ids, len(prompt), 16, compression=snap(24))
                assert (alone - plain).abs().max() < 1e-3 * plain.std()


def test_repeated_and_selected_rows_decode_as_the_row_they_copy():
    from yoco.engine import decode_step, prefill

    model = make_model("yoco-swa")
    quantization = KVQuantization(4, **TINY)
    ids, pad = left_pad([list(range(3, 60)), list(range(5, 40))])
    with torch.no_grad():
        cache = model.new_cache(2, capacity=80, pad=pad, kv_bits=quantization)
        logits = prefill(model, ids, cache, 16)
        token = logits.argmax(-1)
        copies = cache.select(torch.tensor([1, 1, 0]))
        expected = decode_step(model, token, cache)
        got = decode_step(model, token[[1, 1, 0]], copies)
    torch.testing.assert_close(got, expected[[1, 1, 0]], atol=1e-5, rtol=1e-5)
    assert copies.layers[-1].held == [cache.layers[-1].held[i] for i in (1, 1, 0)]
