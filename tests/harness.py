"""What more than one test module uses (a test module imports nothing else of tests/, see
tests/test_test_layout.py; fixtures live in conftest.py):

- ``ARCH_VARIANTS``, ``make_model(variant)``: the architectures under the equivalence harness, built tiny;
- ``engine_logits``: the cached path (chunked prefill, teacher-forced decode) every scoring path is
  compared with;
- ``run``: greedy decode of a yoco model or an ``TransformersLM``, every step's logits and the cache;
- ``POLICIES``: the compression policies that take a budget, by name;
- ``hf_model``: a small randomly initialised transformers Llama, Mistral or Qwen2;
- ``left_padded``: prompts as transformers takes them, ids and attention mask left-padded with 0;
- ``CPU``, ``cpu_step``: a ``Step`` on the CPU, for calling a token mixer directly;
- ``run_in_pieces``: a token mixer in one call, in pieces through a cache, and a token at a time;
- ``rms_norm_reference``: RMSNorm written out in float64, what the norms are checked against;
- ``naive_attention``: float64 grouped-query attention under a visibility mask, the attention reference;
- ``serving``: an ASGI app served by uvicorn on 127.0.0.1 on a free port, for the length of a ``with``.
"""

from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from yoco import build_model
from yoco.compress import CORM, H2O, PyramidKV, SnapKV, StreamingLLM
from yoco.compress.policies import TOVA, AdaKV
from yoco.engine import decode_step, left_pad, prefill
from yoco.layers import Step

# Architectures under the shared equivalence harness (tiny preset, fp32): the three named
# architectures plus the Transformer's window-only control, MQA and MHA head layouts, cross-layer
# sharing (CLA, MLKV), MLA alone and composed with a low-rank query and CLA, YOCO split points, and
# the Block Transformer.
ARCH_VARIANTS = {
    "transformer": ("transformer", {}),
    "transformer-window": ("transformer", {"window": 16}),
    "transformer-mqa": ("transformer", {"n_kv_heads": 1}),
    "yoco-swa-mha": ("yoco-swa", {"n_kv_heads": 4}),
    "cla2": ("transformer", {"cla_factor": 2}),
    "mqa-cla2": ("transformer", {"n_kv_heads": 1, "cla_factor": 2}),
    "mlkv": ("transformer", {"mlkv_layers": 3}),
    "mla": ("transformer", {"attention": "mla"}),
    "mla-q-cla2": ("transformer", {"attention": "mla", "mla_q_rank": 32, "cla_factor": 2}),
    "yoco-swa": ("yoco-swa", {}),
    "yoco-swa-split1": ("yoco-swa", {"n_self_layers": 1}),
    "yoco-gret": ("yoco-gret", {}),
    "yoco-gret-split3": ("yoco-gret", {"n_self_layers": 3}),
    "yoco-gdn": ("yoco-gdn", {}),
    "block": ("block", {}),
    # How the global attention sees positions (tiny scales, so that each option changes the logits within
    # a test's few hundred tokens): NoPE with Llama 4's temperature, the log-n temperature, and the
    # training-free RoPE extensions.
    "yoco-swa-nope": ("yoco-swa", {"global_position": "nope", "attn_temperature": "llama4", "attn_floor_scale": 8}),
    "yoco-gret-log": ("yoco-gret", {"attn_temperature": "log", "attn_train_len": 16}),
    "yoco-swa-yarn": ("yoco-swa", {"rope_extension": "yarn", "rope_factor": 4.0, "rope_original_len": 32}),
    "transformer-nope": ("transformer", {"global_position": "nope", "attn_temperature": "log", "attn_train_len": 8}),
    "transformer-ntk": ("transformer", {"rope_extension": "ntk", "rope_factor": 8.0}),
    "transformer-pi": ("transformer", {"rope_extension": "pi", "rope_factor": 2.0}),
}


def make_model(variant: str, **extra):
    arch, overrides = ARCH_VARIANTS[variant]
    return build_model(arch, preset="tiny", seed=0, **{**overrides, **extra})


def engine_logits(model, ids: torch.Tensor, prompt_len: int, chunk: int, pad=None, compression=None,
                  kv_bits=None) -> torch.Tensor:
    """Logits at positions prompt_len-1 .. T-1 of ids [B, T] the way generation computes them: chunked
    prefill of the prompt, then one cached decode step per token (teacher-forced; the cache compressed
    by ``compression`` after the prompt, and quantized by ``kv_bits``, if given)."""
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1], pad=pad, compression=compression, kv_bits=kv_bits)
    with torch.no_grad():
        out = [prefill(model, ids[:, :prompt_len], cache, chunk)]
        for t in range(prompt_len, ids.shape[1]):
            out.append(decode_step(model, ids[:, t], cache))
    return torch.stack(out, dim=1)


def run(model, prompts, policy, steps=6, chunk=16):
    """Greedy decode of a yoco model or an ``TransformersLM``; every step's logits [B, V] and the cache."""
    ids, pad = left_pad(prompts)
    cache = model.new_cache(len(prompts), pad=pad, compression=policy)
    logits = [prefill(model, ids, cache, chunk)]
    for _ in range(steps):
        logits.append(decode_step(model, logits[-1].argmax(-1), cache))
    return torch.stack(logits), cache


POLICIES = {"streamingllm": StreamingLLM, "snapkv": SnapKV, "pyramidkv": PyramidKV, "adakv": AdaKV, "h2o": H2O,
            "tova": TOVA, "corm": CORM}

HF_SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


def hf_model(kind="llama", layers=3, **extra):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **HF_SIZES, **extra)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=layers, **HF_SIZES, **extra)).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **HF_SIZES, **extra)).eval()


def left_padded(prompts):
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


CPU = torch.device("cpu")


def cpu_step(start, length, pad=None):
    return Step(start, length, pad=pad, device=CPU)


def run_in_pieces(mixer, x: torch.Tensor, pieces):
    """A token mixer over x [B, T, dim] three ways: one call without a cache, calls of the given lengths
    through one cache, and a token at a time through another. Returns (full, pieces, tokens, the pieces'
    cache, the tokens' cache): what the recurrent mixers' tests compare."""
    B, T, _ = x.shape
    assert sum(pieces) == T
    with torch.no_grad():
        full = mixer(x, cpu_step(0, T))
        piece_cache = mixer.new_cache(B, dtype=x.dtype, device="cpu")
        outs, start = [], 0
        for n in pieces:
            outs.append(mixer(x[:, start:start + n], cpu_step(start, n), piece_cache))
            start += n
        token_cache = mixer.new_cache(B, dtype=x.dtype, device="cpu")
        tokens = torch.cat([mixer(x[:, t:t + 1], cpu_step(t, 1), token_cache) for t in range(T)], dim=1)
    return full, torch.cat(outs, dim=1), tokens, piece_cache, token_cache


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * w.double() if w is not None else y


def naive_attention(q, k, v, visible=None):
    """float64 softmax(q k^T / sqrt(d)) v with K/V repeated per query group; visible [.., Tq, S] bool."""
    H, n_kv, d = q.shape[1], k.shape[1], q.shape[-1]
    k = k.double().repeat_interleave(H // n_kv, dim=1)
    v = v.double().repeat_interleave(H // n_kv, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * d ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@contextmanager
def serving(app, timeout: float = 30.0):
    """Serve an ASGI app (``yoco.serve.app.create_app``) with uvicorn on 127.0.0.1, on a free port, in a
    thread of this process; yields its base URL and stops it afterwards (each wait bounded)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
