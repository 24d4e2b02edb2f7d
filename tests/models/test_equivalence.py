"""The equivalence harness every architecture runs: cached inference == the full forward."""

import pytest
import torch
from harness import engine_logits, make_model

from yoco.engine import generate, left_pad, prefill
from yoco.models.base import Block

ATOL = 1e-5
RTOL = 1e-5


# Window 16, retention chunk 16 in the tiny preset: prompts shorter than, equal to and much longer
# than the window, chunks that do not divide the prompt, 40 decode steps crossing the window edge.
@pytest.mark.parametrize("prompt_len,chunk", [(1, 4), (5, 3), (16, 16), (37, 7), (37, 1000), (70, 16)])
def test_cached_decode_equals_full_forward(variant, prompt_len, chunk):
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len + 40))
    with torch.no_grad():
        full = model(ids)
    got = engine_logits(model, ids, prompt_len, chunk)
    torch.testing.assert_close(got, full[:, prompt_len - 1:], atol=ATOL, rtol=RTOL)


def test_last_position_logits_match(variant):
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, num_logits=3), model(ids)[:, -3:], atol=ATOL, rtol=RTOL)
        assert model(ids, num_logits=0) is None


def alone(model, prompt: list[int], continuation: list[int] = ()) -> torch.Tensor:
    """One row's logits, run by itself with no padding at all."""
    with torch.no_grad():
        return model(torch.tensor([list(prompt) + list(continuation)]))[0]


def test_padded_full_forward_equals_each_row_alone(variant):
    model = make_model(variant)
    lengths = [29, 11, 1]
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in lengths]
    ids, pad = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, pad=pad)
    for row, p in enumerate(prompts):
        torch.testing.assert_close(batched[row, pad[row]:], alone(model, p), atol=ATOL, rtol=RTOL)


def test_padded_cached_decode_equals_each_row_alone(variant):
    model = make_model(variant)
    lengths = [23, 6]
    seqs = [torch.randint(0, model.config.vocab_size, (n + 20,)).tolist() for n in lengths]
    prompts = [s[:n] for s, n in zip(seqs, lengths)]
    ids, pad = left_pad(prompts)
    continuation = torch.tensor([s[n:] for s, n in zip(seqs, lengths)])
    full_ids = torch.cat([ids, continuation], dim=1)
    got = engine_logits(model, full_ids, ids.shape[1], chunk=5, pad=pad)
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        torch.testing.assert_close(got[row], alone(model, s[:n], s[n:])[n - 1:], atol=ATOL, rtol=RTOL)


def test_batched_generation_equals_one_by_one(variant):
    model = make_model(variant)
    lengths = [3, 40, 17, 1]
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in lengths]
    batched = generate(model, prompts, max_new_tokens=24, prefill_chunk=8)
    for row, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=24, prefill_chunk=8)
        assert batched.tokens[row] == alone.tokens[0]


@pytest.mark.parametrize("prompt_len", [21, 22, 23])
def test_generation_follows_the_full_forward(variant, prompt_len):
    """The engine's greedy tokens are the argmax of the plain forward over the prompt and the tokens so
    far (what scoring and a generate without cache compute), for prompts of every length modulo the
    Block Transformer's block."""
    model = make_model(variant)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    tokens = generate(model, [prompt], max_new_tokens=6, prefill_chunk=8).tokens[0]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            sequence.append(int(model(torch.tensor([sequence]), num_logits=1)[0, -1].argmax()))
    assert tokens == sequence[prompt_len:]


@pytest.mark.parametrize("arch", ["yoco-swa", "yoco-gret", "yoco-gdn"])
def test_yoco_prefill_skips_cross_decoder(arch):
    model = make_model(arch)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1])) for layer in model.cross_layers]
    cache = model.new_cache(1, capacity=64)
    with torch.no_grad():
        prefill(model, torch.randint(0, 256, (1, 50)), cache, chunk=8)
    for h in hooks:
        h.remove()
    # Only the last prompt token went through the cross-decoder, once per cross layer.
    assert calls == [1] * len(model.cross_layers)


def test_bf16_cached_decode_tracks_fp32(variant):
    model = make_model(variant)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        reference = model(ids)[:, 19:]
    bf16 = model.to(torch.bfloat16)
    got = engine_logits(bf16, ids, 20, chunk=6).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits; the argmax of random logits mostly survives.
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()



def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant, monkeypatch):
    """A checkpointed block recomputes its activations in backward: the same loss and gradients, every
    block run twice (forward and recomputation); a forward with a cache is never checkpointed (its
    recomputation would write the cache twice), even with gradients on."""
    ids = torch.randint(0, 256, (2, 40))

    def loss_and_grads(model):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, model = make_model(variant), make_model(variant)
    want_loss, want_grads = loss_and_grads(plain)
    model.set_activation_checkpointing(True)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b.gradient_checkpointing for b in blocks)
    runs = []  # (block, whether its arguments held a cache) of every run of a block's body
    inner = Block._forward
    monkeypatch.setattr(Block, "_forward",
                        lambda self, x, step, *a, **k: runs.append((self, not step.cache_free)) or inner(self, x, step, *a, **k))
    got_loss, got_grads = loss_and_grads(model)
    assert len(runs) == 2 * len(blocks)
    torch.testing.assert_close(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    def cached_runs(m):
        runs.clear()
        cache = m.new_cache(2, capacity=41)
        m(ids[:, :30], cache).sum().backward()  # gradients on, through a cache
        return [block for block, held in runs if held], cache

    plain_runs, _ = cached_runs(plain)
    checkpointed_runs, cache = cached_runs(model)
    assert len(checkpointed_runs) == len(plain_runs) > 0  # a call with a cache runs once: not checkpointed
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, 30:], cache), plain(ids)[:, 30:], atol=ATOL, rtol=RTOL)
