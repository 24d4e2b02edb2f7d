"""Shared by the tests: the architecture variants under the equivalence harness, and the cached path
every scoring path is compared with."""

import torch

from yoco import build_model
from yoco.engine import decode_step, prefill

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
    "block": ("block", {}),
}


def make_model(variant: str, **extra):
    arch, overrides = ARCH_VARIANTS[variant]
    return build_model(arch, preset="tiny", seed=0, **{**overrides, **extra})


def engine_logits(model, ids: torch.Tensor, prompt_len: int, chunk: int, pad=None, compression=None) -> torch.Tensor:
    """Logits at positions prompt_len-1 .. T-1 of ids [B, T] the way generation computes them: chunked
    prefill of the prompt, then one cached decode step per token (teacher-forced; the cache compressed
    by ``compression`` after the prompt, if given)."""
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1], pad=pad, compression=compression)
    with torch.no_grad():
        out = [prefill(model, ids[:, :prompt_len], cache, chunk)]
        for t in range(prompt_len, ids.shape[1]):
            out.append(decode_step(model, ids[:, t], cache))
    return torch.stack(out, dim=1)
