"""The engine's model protocol, written once (engine.EngineModel / EngineCache), implemented by yoco's
models and by the one transformers runner (hf_runner.TransformersLM) that bench, compress-eval and
the compression tests use; the runner needs yoco.compress only for a compressed cache."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import yoco
from yoco.cache import CacheError, ModelCache
from yoco.compress import SnapKV
from yoco.compress.hf import CompressedCache
from yoco.engine import EngineCache, EngineModel, decode_step, generate, left_pad, prefill
from yoco.hf_runner import TransformersCache, TransformersLM
from yoco.models import build_model

SOURCE = Path(yoco.__file__).parent


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).eval()


def test_yoco_models_and_the_transformers_runner_implement_the_protocol():
    core, lm = build_model("yoco-swa", preset="tiny", seed=0), TransformersLM(llama())
    for model in (core, lm):
        assert isinstance(model, EngineModel)
        assert isinstance(model.config.max_seq_len, int) and isinstance(model.config.vocab_size, int)
    assert lm.config.max_seq_len == 256 and lm.config.vocab_size == 300 and lm.config.arch == "llama"
    assert not isinstance(nn.Linear(2, 2), EngineModel)  # no new_cache, no config
    caches = [core.new_cache(1), core.new_cache(1, compression=SnapKV(4)), lm.new_cache(1),
              lm.new_cache(1, compression=SnapKV(4))]
    assert [type(c) for c in caches] == [ModelCache, ModelCache, TransformersCache, CompressedCache]
    assert all(isinstance(c, EngineCache) for c in caches)


def test_an_uncompressed_transformers_cache_refuses_to_compress_and_repeats_its_rows():
    lm = TransformersLM(llama())
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (12, 9)]
    ids, pad = left_pad(prompts)
    cache = lm.new_cache(2, pad=pad)
    with pytest.raises(CacheError, match="no compression policy"):
        cache.compress()
    token = prefill(lm, ids, cache, 4).argmax(-1)
    bytes_before = cache.nbytes()
    repeated = cache.repeat(3)
    assert repeated.nbytes() == 3 * bytes_before and repeated.pad.tolist() == [0, 0, 0, 3, 3, 3]
    logits = decode_step(lm, token.repeat_interleave(3), repeated)
    alone = generate(lm, [prompts[1]], 2).tokens[0]
    assert logits[3:].argmax(-1).tolist() == [alone[1]] * 3


def module_level_imports(path: Path) -> list[str]:
    """The modules a source file imports when it is imported (not inside functions)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


@pytest.mark.parametrize("module", ["engine.py", "hf_runner.py", "bench.py", "study.py", "models/__init__.py",
                                    "models/base.py"])
def test_the_engine_side_does_not_import_compress(module):
    imports = module_level_imports(SOURCE / module)
    assert imports and not [name for name in imports if "compress" in name]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_transformers_own_quantized_cache_runs_as_the_peer_or_is_refused_with_its_reason(bits):
    from yoco.hf_runner import QUANTIZED_BACKENDS, TransformersQuantizedCache
    from yoco.models.base import InputError
    from yoco.quantize import KVQuantization

    lm = TransformersLM(llama())
    quantization = KVQuantization(bits, group=16, residual=8)  # 16-wide heads
    try:
        cache = lm.new_cache(1, kv_bits=quantization)
    except InputError as error:  # its backend is not installed here, or not in this transformers
        assert f"QuantizedCache ({QUANTIZED_BACKENDS[bits]} backend, {bits} bits) is not available" in str(error)
        return
    assert isinstance(cache, TransformersQuantizedCache) and cache.backend == QUANTIZED_BACKENDS[bits]
    ids = torch.randint(1, 300, (1, 60), generator=torch.Generator().manual_seed(1))
    plain = lm.new_cache(1)
    full = [prefill(lm, ids[:, :40], plain, 8)] + [decode_step(lm, ids[:, t], plain) for t in range(40, 60)]
    got = [prefill(lm, ids[:, :40], cache, 8)] + [decode_step(lm, ids[:, t], cache) for t in range(40, 60)]
    error = (torch.stack(got) - torch.stack(full)).abs().max().item()
    assert 0 < error < 0.5 * torch.stack(full).std().item()  # quantized, and still the same model
    assert 0 < cache.nbytes() < plain.nbytes()
    token = got[-1].argmax(-1)
    alone = decode_step(lm, token, cache)
    twin = lm.new_cache(1, kv_bits=quantization)  # the same history, then each row twice
    prefill(lm, ids[:, :40], twin, 8)
    for t in range(40, 60):
        decode_step(lm, ids[:, t], twin)
    both = decode_step(lm, token.repeat_interleave(2), twin.repeat(2))
    torch.testing.assert_close(both, alone.expand(2, -1), atol=0.05 * alone.std().item(), rtol=0)
