"""Model surgery: turning one architecture's weights into another's starting point."""

from __future__ import annotations

import torch

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


def share_kv_layers(model: CausalLM, *, cla_factor: int = 1, mlkv_layers: int | None = None) -> CausalLM:
    """CLA / MLKV uptraining start point (Zuhri et al. 2024): the returned model keeps K/V
    projections only in its producing layers, each the mean of the K/V projections of the layers that
    will read it (itself included); every other weight is copied. Continue training from here."""
    cfg = model.config
    if cfg.arch != "transformer" or cfg.attention != "gqa" or len(set(cfg.kv_sources)) != cfg.n_layers:
        raise ConfigError("cross-layer sharing converts a GQA/MHA Transformer without sharing, not "
                          f"arch={cfg.arch} attention={cfg.attention} cla_factor={cfg.cla_factor} "
                          f"mlkv_layers={cfg.mlkv_layers}")
    new_cfg = cfg.replace(cla_factor=cla_factor, mlkv_layers=mlkv_layers)  # validates the request
    old_state = model.state_dict()
    state = {name: t for name, t in old_state.items() if not name.endswith(("mixer.k_proj.weight", "mixer.v_proj.weight"))}
    sources = new_cfg.kv_sources
    for producer in sorted(set(sources)):
        readers = [i for i, src in enumerate(sources) if src == producer]
        for proj in ("k_proj", "v_proj"):
            weights = [old_state[f"layers.{i}.mixer.{proj}.weight"] for i in readers]
            state[f"layers.{producer}.mixer.{proj}.weight"] = torch.stack(weights).mean(0)
    param = next(model.parameters())
    new = build_model(new_cfg, dtype=param.dtype, device=param.device)
    new.load_state_dict(state)
    return new.eval()


__all__ = ["convert_kv_heads", "share_kv_layers"]
