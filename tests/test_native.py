"""The native attention kernels (yoco/native.py, csrc/): decode attention over float32 and over quantized
keys and values, and a prefill chunk's sliding-window attention: each equals the formula or the PyTorch
path it stands beside, for every shape it takes, and everything around them falls back cleanly."""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import engine_logits, make_model

from yoco import kernels, native
from yoco.cache import KVGeometry
from yoco.layers import Step
from yoco.quantize import KVQuantization, QuantizedKV

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernel is not built")


def _filled(bits, B, h, d, lengths, group, residual=16, seed=0):
    """A quantized cache whose rows hold ``lengths`` real tokens (left-padded to the longest), then one
    more call of one token; and each row's quantized positions the next attend reads."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    pad = torch.tensor([T - n for n in lengths])
    cache = QuantizedKV(KVGeometry(h, d, d), KVQuantization(bits, group=group, residual=residual), B,
                        dtype=torch.float32, pad=pad)
    cache.append(torch.randn(B, h, T, d, generator=g), torch.randn(B, h, T, d, generator=g))
    cache.append(torch.randn(B, h, 1, d, generator=g), torch.randn(B, h, 1, d, generator=g))
    return cache, pad, [min(n, m) for n, m in zip(cache.quantized, cache.before)]


SHAPES = [  # B, h, query heads, dims, each row's tokens, group: specialised and generic shapes
    (1, 2, 8, 64, [3000], 32),  # the 40m preset's decode (4 queries per K/V head, 64 wide)
    (2, 2, 4, 64, [2500, 700], 32),  # rows of unequal length, and a short last group
    (1, 2, 16, 128, [1800], 32),
    (2, 1, 3, 192, [1300, 1299], 32),  # the generic path: 3 queries, 192 wide
    (1, 2, 4, 32, [999], 32),  # 2-bit planes of 8 bytes
    (1, 1, 2, 128, [1500], 64),
]


@needs_kernel
@pytest.mark.parametrize("bits,shape", list(itertools.product((8, 4, 2), SHAPES)))
def test_the_kernel_equals_the_pytorch_path(bits, shape):
    B, h, H, d, lengths, group = shape
    cache, pad, counts = _filled(bits, B, h, d, lengths, group)
    q = torch.randn(B, H, 1, d, generator=torch.Generator().manual_seed(9))
    got = cache._attend_native(q, counts, None)
    assert got is not None, "the kernel declined a shape it takes"
    n = max(counts)
    slots = cache.position_slots(None, 0, n, counts, torch.zeros(B, dtype=torch.long))
    want = cache._attend_codes(q, n, slots, counts, Step(max(lengths), 1, pad, torch.device("cpu")), None)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-6)


@needs_kernel
def test_a_row_with_nothing_quantized_weighs_nothing_and_a_custom_scale_is_used():
    cache, pad, counts = _filled(4, 2, 2, 64, [2000, 40], 32, residual=64)
    assert counts[1] == 0 < counts[0]
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(3))
    out, lse = cache._attend_native(q, counts, 0.3)
    assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    n = max(counts)
    slots = cache.position_slots(None, 0, n, counts, torch.zeros(2, dtype=torch.long))
    want = cache._attend_codes(q, n, slots, counts, Step(2000, 1, pad, torch.device("cpu")), 0.3)
    torch.testing.assert_close(out[0], want[0][0], atol=2e-6, rtol=1e-5)


@needs_kernel
def test_shapes_it_does_not_take_go_the_pytorch_way():
    cache, _, counts = _filled(2, 1, 2, 16, [500], 8)  # groups of 8 tokens: fewer than a vector
    assert cache._attend_native(torch.randn(1, 4, 1, 16), counts, None) is None
    cache, _, counts = _filled(4, 1, 2, 48, [500], 16)  # 48 channels pack into 24 bytes: not whole vectors
    assert cache._attend_native(torch.randn(1, 2, 1, 48), counts, None) is None
    cache, _, counts = _filled(4, 1, 2, 64, [500], 32)
    assert cache._attend_native(torch.randn(1, 2, 80, 64), counts, None) is None  # a prefill chunk: 80 queries a head
    dense = cache.v_scale
    cache.v_scale = cache.v_zero = dense.transpose(2, 3).contiguous().transpose(2, 3)  # its rows not dense
    assert cache._attend_native(torch.randn(1, 2, 1, 64), counts, None) is None
    cache.v_scale = cache.v_zero = dense.expand(3, -1, -1, -1)[:1]  # a repeated row: stride 0, still dense
    assert cache._attend_native(torch.randn(1, 2, 1, 64), counts, None) is not None


def _with_and_without(kernel_owner, kernel_name, run, monkeypatch):
    """``run()`` with the native kernels (which must then be used, by ``kernel_owner.kernel_name``
    answering) and without them (``YOCO_NATIVE=0``: never used); both results."""
    fused = []
    kernel = getattr(kernel_owner, kernel_name)

    def counted(*args):
        out = kernel(*args)
        fused.append(out is not None)
        return out

    monkeypatch.setattr(kernel_owner, kernel_name, counted)
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("YOCO_NATIVE", setting)
        results[setting] = run()
        if setting == "1":
            assert any(fused), "the kernel was never used"
            fused.clear()
    assert not any(fused)
    return results["1"], results["0"]


@needs_kernel
@pytest.mark.parametrize("variant", ["transformer", "yoco-swa"])
def test_decoding_through_the_kernel_equals_decoding_without_it(variant, monkeypatch):
    model = make_model(variant)  # the tiny preset's 16-wide heads: groups of 16, 8 and 4 bits are taken
    ids = torch.randint(0, model.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(5))
    fused, unfused = _with_and_without(
        QuantizedKV, "_attend_native",
        lambda: {bits: engine_logits(model, ids, 120, 32, kv_bits=KVQuantization(bits, group=16, residual=16))
                 for bits in (8, 4)}, monkeypatch)
    for bits in (8, 4):
        torch.testing.assert_close(fused[bits], unfused[bits], atol=1e-4, rtol=1e-4)


DENSE_SHAPES = [  # B, h, query heads, queries, dims, positions: specialised and generic shapes
    (1, 2, 8, 1, 64, 16384),  # the 40m preset's decode over a long cache (split over both cores)
    (3, 2, 4, 1, 32, 1000),  # the small preset's
    (2, 2, 8, 2, 64, 37),  # two queries a head, a short last block
    (1, 8, 8, 1, 128, 1),
    (2, 1, 6, 1, 48, 300),  # the generic path: 6 queries, 48 wide
    (1, 2, 4, 1, 16, 5),  # the tiny preset's
    (1, 2, 8, 1, 64, 20000),  # units of 2,512 keys: blocks of 64 end inside them
]


def _dense_reference(q, k, v, scale):
    """Attention and log-sum-exp by the formula, in float64."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)
    return (scores.softmax(-1) @ v).float(), scores.logsumexp(-1).float()


@needs_kernel
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_dense_kernel_equals_the_formula(shape, scale):
    B, h, H, T, d, S = shape
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, T, d, generator=g)
    # keys and values as a cache holds them: the first S slots of a larger buffer, one per head
    k = torch.randn(B, h, S + 7, d, generator=g)[:, :, :S]
    v = torch.randn(B, h, S + 7, d, generator=g)[:, :, :S]
    got = kernels.native_decode_attention(q, k, v, scale)
    assert got is not None, "the kernel declined a shape it takes"
    want = _dense_reference(q, k, v, scale)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-6)
    if T == 1:  # and attend() takes it for a decode step
        torch.testing.assert_close(kernels.attend(q, k, v, scale=scale), want[0], atol=2e-6, rtol=1e-5)


@needs_kernel
def test_what_the_dense_kernel_does_not_take_goes_the_pytorch_way():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 50, 64)
    assert kernels.native_decode_attention(q, k, k) is not None
    assert kernels.native_decode_attention(q.half(), k.half(), k.half()) is None  # float32 and bfloat16 only
    assert kernels.native_decode_attention(q, k.bfloat16(), k.bfloat16()) is None  # queries of the cache's dtype
    assert kernels.native_decode_attention(torch.randn(1, 4, 40, 64), k, k) is None  # 80 queries a head
    assert kernels.native_decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k) is None
    assert kernels.native_decode_attention(q[..., :40], k[..., :40], k[..., :40]) is None  # 40 wide
    wanted = q.clone().requires_grad_()
    assert kernels.native_decode_attention(wanted, k, k) is None  # gradients: PyTorch's autograd path
    with torch.no_grad():
        assert kernels.native_decode_attention(wanted, k, k) is not None


@needs_kernel
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_the_dense_kernel_reads_a_bf16_cache_widened(shape):
    # bf16 keys and values are widened exactly; the arithmetic is float32's: the formula over the same
    # widened values, up to float32 rounding, and the output rounded to bf16 as the model's activations
    B, h, H, T, d, S = shape
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, T, d, generator=g).bfloat16()
    k = torch.randn(B, h, S + 7, d, generator=g).bfloat16()[:, :, :S]
    v = torch.randn(B, h, S + 7, d, generator=g).bfloat16()[:, :, :S]
    got = kernels.native_decode_attention(q, k, v)
    assert got is not None and got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    want = _dense_reference(q.float(), k.float(), v.float(), None)
    torch.testing.assert_close(got[0], want[0].bfloat16(), atol=0, rtol=0.008)  # bf16's rounding step: 2^-7
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-6)


@needs_kernel
def test_a_compiled_decode_step_reads_the_cache_through_the_kernel():
    # fullgraph: a ctypes call would break the graph; the operator stays in it (dynamo's eager backend:
    # no C++ compiler needed) and the profile shows it ran
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    step = torch.compile(lambda q, k, v: kernels.attend(q, k, v), backend="eager", fullgraph=True)
    with torch.profiler.profile() as profile:
        got = step(q, k, v)
    assert "yoco::dense_decode_attention" in {event.key for event in profile.key_averages()}
    torch.testing.assert_close(got, _dense_reference(q, k, v, None)[0], atol=2e-6, rtol=1e-5)


def test_the_kernel_operator_without_the_library_computes_the_formula(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    q, k, v = torch.randn(2, 4, 2, 32), torch.randn(2, 2, 70, 32), torch.randn(2, 2, 70, 32)
    got = kernels.dense_decode(q, k, v, 0.3)
    want = _dense_reference(q, k, v, 0.3)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("variant", ["transformer", "yoco-swa", "yoco-gret"])
def test_decoding_through_the_dense_kernel_equals_decoding_without_it(variant, monkeypatch):
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(6))
    fused, unfused = _with_and_without(kernels, "native_decode_attention", lambda: engine_logits(model, ids, 60, 30),
                                       monkeypatch)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)


WINDOW_SHAPES = [  # B, h, query heads, dims, queries, keys before them, window
    (1, 2, 8, 64, 300, 127, 128),  # the 40m preset's heads after a full window, a partial last tile
    (2, 2, 4, 64, 100, 0, 64),  # a prompt's first chunk: no earlier keys, the window shorter than it
    (1, 1, 1, 32, 50, 20, 300),  # one head; a window reaching back past every key (causal)
    (1, 2, 6, 128, 40, 9, 10),  # 3 query heads a K/V head, 128 wide
    (1, 4, 8, 16, 33, 5, 1),  # a window of 1: each query sees itself only
    (2, 1, 8, 48, 70, 30, 31),  # the generic width; 8 query heads on one K/V head (128 rows a tile)
    (1, 2, 8, 64, 64, 2000, 2064),  # a prefill chunk's causal attention over a cache's 2,000 earlier keys
    (2, 2, 4, 64, 200, 700, 600),  # units of 4 tiles whose bands cross spans of 512 keys at different places
]


def _window_reference(q, k, v, earlier, window, scale=None):
    """Sliding-window attention by the formula, in float64: query t sees keys earlier + t - window < j <=
    earlier + t."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    query_at = torch.arange(T)[:, None] + earlier
    key_at = torch.arange(k.shape[2])[None, :]
    seen = (key_at <= query_at) & (key_at > query_at - window)
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)).masked_fill(
        ~seen, float("-inf"))
    return (scores.softmax(-1) @ v).float()


@needs_kernel
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_window_kernel_equals_the_formula(shape, scale):
    B, h, H, d, T, earlier, window = shape
    g = torch.Generator().manual_seed(T + earlier)
    q = torch.randn(B, T, H, d, generator=g).transpose(1, 2)  # as the model hands them: [B, T, H, d] moved
    k = torch.randn(B, h, earlier + T, d, generator=g)
    v = torch.randn(B, h, earlier + T + 3, d, generator=g)[:, :, :earlier + T]  # a slice of a longer buffer
    got = kernels.native_window_attention(q, k, v, earlier, window, scale)
    assert got is not None, "the kernel declined a shape it takes"
    torch.testing.assert_close(got, _window_reference(q, k, v, earlier, window, scale), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_what_the_window_kernel_does_not_take_goes_the_pytorch_way():
    q, k = torch.randn(1, 4, 20, 64), torch.randn(1, 2, 25, 64)
    assert kernels.native_window_attention(q, k, k, 5, 8) is not None
    # bf16: widened for the kernel, the result rounded back (exactly the fp32 kernel on the widened inputs)
    q16, k16 = q.bfloat16(), k.bfloat16()
    got = kernels.native_window_attention(q16, k16, k16, 5, 8)
    assert got.dtype == torch.bfloat16
    assert got.equal(kernels.native_window_attention(q16.float(), k16.float(), k16.float(), 5, 8).bfloat16())
    assert kernels.native_window_attention(q.half(), k.half(), k.half(), 5, 8) is None  # float32 and bf16 only
    assert kernels.native_window_attention(q[..., :40], k[..., :40], k[..., :40], 5, 8) is None  # 40 wide
    wide = torch.randn(1, 4, 20, 256), torch.randn(1, 2, 25, 256)
    assert kernels.native_window_attention(wide[0], wide[1], wide[1], 5, 8) is None  # wider than 128
    one_kv = torch.randn(1, 1, 25, 64)
    assert kernels.native_window_attention(torch.randn(1, 16, 20, 64), one_kv, one_kv, 5, 8) is None  # 16 a K/V head
    assert kernels.native_window_attention(q, k, k, 4, 8) is None  # the keys must end with the queries' own
    assert kernels.native_window_attention(q, k, torch.randn(1, 2, 25, 32), 5, 8) is None  # values of another width
    assert kernels.native_window_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, k, 5, 8) is None
    wanted = q.clone().requires_grad_()
    assert kernels.native_window_attention(wanted, k, k, 5, 8) is None  # gradients: PyTorch's autograd path
    with torch.no_grad():
        assert kernels.native_window_attention(wanted, k, k, 5, 8) is not None


@needs_kernel
@pytest.mark.parametrize("variant", ["yoco-swa", "transformer-window"])
def test_prefill_through_the_window_kernel_equals_prefill_without_it(variant, monkeypatch):
    from yoco.mixers import sliding_window

    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(8))
    fused, unfused = _with_and_without(sliding_window, "native_window_attention",
                                       lambda: engine_logits(model, ids, 100, 30), monkeypatch)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("variant", ["transformer", "transformer-mqa", "cla2", "mlkv", "block", "transformer-ntk"])
def test_causal_prefill_through_the_kernel_equals_prefill_without_it(variant, monkeypatch):
    """A prefill chunk's causal attention (the first chunk's, and a later chunk's over the cache's earlier
    keys) runs in the window kernel with a window past every key; the logits are those of PyTorch's."""
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(9))
    fused, unfused = _with_and_without(kernels, "native_window_attention", lambda: engine_logits(model, ids, 100, 30),
                                       monkeypatch)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)


def test_a_failed_build_warns_once_and_leaves_the_pytorch_path(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("YOCO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="native kernels are not available"):
        assert native.library() is None
    assert native.library() is None  # tried once: no second warning, no second build
    assert not any(tmp_path.rglob("*.partial")), "a failed build left its partial file behind"
    cache, _, counts = _filled(4, 1, 2, 64, [600], 32)
    assert cache._attend_native(torch.randn(1, 8, 1, 64), counts, None) is None
    k = torch.randn(1, 2, 30, 64)
    assert kernels.native_decode_attention(torch.randn(1, 8, 1, 64), k, k) is None


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("YOCO_NATIVE", "0")
    assert native.library() is None


@needs_kernel
def test_the_library_is_built_once_per_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("YOCO_CACHE_DIR", str(tmp_path))
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    source = tmp_path / "other.c"
    source.write_text(native.SOURCES[0].read_text() + "\n/* another text */\n")
    assert native.build((source, *native.SOURCES[1:])) != first
