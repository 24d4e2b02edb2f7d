"""Model surgery: turning one architecture's weights into another's starting point."""

from __future__ import annotations


from .config import ConfigError
from .models import CausalLM, build_model


def convert_kv_heads(model: CausalLM, n_kv_heads: int) -> CausalLM:
    """MHA -> GQA -> MQA uptraining start point (Ainslie et al. 2023): each new K/V head is the mean of
    the K and V projection heads of its group. RoPE is linear, so pooling before it is exact: a model
    whose K/V heads are equal within each group converts with identical logits."""
    cfg = model.config
    if cfg.arch != "transformer" or cfg.attention != "gqa":
        raise ConfigError(f"K/V head pooling converts a GQA/MHA Transformer, not arch={cfg.arch} "
                          f"attention={cfg.attention}")
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or cfg.n_kv_heads % n_kv_heads:
        raise ConfigError(f"invalid config: n_kv_heads={n_kv_heads!r}: must divide the model's "
                          f"n_kv_heads={cfg.n_kv_heads}")
    group = cfg.n_kv_heads // n_kv_heads
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("mixer.k_proj.weight", "mixer.v_proj.weight")):
            # Rows are head-major: [n_kv * d_h, dim] -> pool each run of `group` heads.
            tensor = tensor.view(n_kv_heads, group, cfg.head_dim, -1).mean(1).reshape(n_kv_heads * cfg.head_dim, -1)
        state[name] = tensor
    param = next(model.parameters())
    new = build_model(cfg.replace(n_kv_heads=n_kv_heads), dtype=param.dtype, device=param.device)
    new.load_state_dict(state)
    return new.eval()


__all__ = ["convert_kv_heads"]
