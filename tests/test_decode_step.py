"""The engine's decode step: no host synchronisation in any architecture's plain step (the vocabulary is
checked once, at the engine's boundary), and the step torch.compile captures gives the eager step's
tokens and logits."""

import contextlib

import pytest
import torch
from harness import make_model

from yoco import InputError, generate
from yoco.compress import SnapKV
from yoco.engine import Generation, decode_step, decode_stepper, left_pad, prefill, sampled_decode_step

# What reads a tensor's values into Python: on an accelerator each one waits for the device (a host
# synchronisation), and torch.compile cannot capture it without breaking the graph.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Within it, reading a tensor's value into Python raises AssertionError naming the read."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"the decode step read a tensor value (Tensor.{name}): a host synchronisation")
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_every_kind_of_read():
    t = torch.tensor([3])
    reads = [lambda: t.item(), lambda: t.tolist(), lambda: bool(t), lambda: int(t), lambda: float(t),
             lambda: [0, 1, 2, 3][t], lambda: t.max() > 0 and None]
    with no_host_reads():
        for read in reads:
            with pytest.raises(AssertionError, match="host synchronisation"):
                read()
    assert int(t) == 3  # restored


# One row (the ring buffers fill during the decode: prompt 5 < window 16), and a left-padded batch of
# three: pads 0, 13 and 17, so the Block Transformer has two phase groups and blocks made only of pads.
BATCHES = {"one row": [[1, 2, 3, 4, 5]],
           "left-padded": [list(range(1, 21)), [7, 8, 9, 10, 11, 12, 13], [4, 5, 6]]}


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_plain_decode_step_reads_no_tensor_value(variant, batch):
    model = make_model(variant).eval()
    ids, pad = left_pad(BATCHES[batch])
    cache = model.new_cache(ids.shape[0], pad=pad)
    with torch.inference_mode():
        tokens = prefill(model, ids, cache, 8).argmax(-1)
        for _ in range(16):
            with no_host_reads():
                logits = sampled_decode_step(model, tokens, cache)
            tokens = logits.argmax(-1)
    assert torch.isfinite(logits).all()


def test_a_direct_call_still_refuses_ids_outside_the_vocabulary():
    model = make_model("transformer")
    with pytest.raises(InputError, match="token id 256 outside the vocabulary 0..255"):
        model(torch.tensor([[1, 256]]))
    cache = model.new_cache(1)
    model(torch.tensor([[1, 2]]), cache)
    with pytest.raises(InputError, match="token id -1 outside the vocabulary"):
        decode_step(model, torch.tensor([-1]), cache)  # checked unless the caller vouches for the tokens
    with pytest.raises(InputError, match="token id 300 outside the vocabulary"):
        prefill(model, torch.tensor([[1, 300, 2]]), model.new_cache(1), 2)


def test_the_engine_refuses_what_its_unchecked_steps_would_feed():
    model = make_model("yoco-swa")
    with pytest.raises(InputError, match="pad_id 256 outside the vocabulary 0..255"):
        generate(model, [[1, 2], [3]], 4, pad_id=256)
    with pytest.raises(InputError, match="decode it without compile"):
        Generation(make_model("block"), [[1, 2]], 4, compile=True)
    with pytest.raises(InputError, match="compressed cache"):
        Generation(model, [[1, 2]], 4, compile=True, compression=SnapKV(8))


# ---------------------------------------------------------------------- torch.compile
# torch's compiler imports a deprecated piece of torch itself (nothing yoco calls)
TORCH_INTERNAL_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.fixture(scope="module")
def compiler():
    """Skips the test when torch.compile cannot run here (no C++ compiler, an unsupported platform)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # whatever inductor raises when it cannot build a kernel
        pytest.skip(f"torch.compile cannot run here: {type(error).__name__}: {error}")


@pytest.mark.filterwarnings(TORCH_INTERNAL_DEPRECATION)
@pytest.mark.parametrize("variant", ["transformer", "yoco-swa"])
def test_compiled_decode_gives_the_eager_tokens_and_logits(variant, compiler):
    # Two layers keep the compilation to a few seconds. The inductor's on-disk cache is off so that a
    # graph cached by another version of the code cannot bring its guards (and a recompile) along.
    with torch._inductor.config.patch(fx_graph_cache=False):
        model = make_model(variant, n_layers=2).eval()
        prompt = [[3, 1, 4, 1, 5]]  # shorter than the window (16): the ring fills while decoding
        compiled = generate(model, prompt, 24, compile=True)
        assert compiled.tokens == generate(model, prompt, 24).tokens
        assert compiled.stats["compile_step_s"] > 0 and compiled.warmup_steps == 1
        step = decode_stepper(model, compile=True)
        ids = torch.tensor(prompt)
        with torch.inference_mode():  # as the generation runs (its tensors are inference tensors)
            eager_cache, compiled_cache = model.new_cache(1, capacity=40), model.new_cache(1, capacity=40)
            tokens = prefill(model, ids, eager_cache, 4).argmax(-1)
            prefill(model, ids, compiled_cache, 4)
            # compiled by the generation above: any further compilation would be a recompile
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(24):
                    eager = sampled_decode_step(model, tokens, eager_cache)
                    torch.testing.assert_close(step(model, tokens, compiled_cache), eager, rtol=0, atol=1e-4)
                    tokens = eager.argmax(-1)
