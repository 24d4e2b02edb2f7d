"""Shared by the tests: the architecture variants under the equivalence harness."""

from yoco import build_model

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
