"""Model surgery: turning one architecture's weights into another's starting point."""

from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig
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


# transformers Llama parameter names -> yoco Transformer names ({i}: layer index).
LLAMA_NAMES = {
    "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.mixer_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.mixer.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.mixer.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.mixer.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.mixer.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.ffn.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.ffn.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.ffn.down_proj.weight",
}


def llama_config(hf_config) -> ModelConfig:
    """The yoco Transformer that computes what a transformers LlamaConfig describes; features the
    baseline does not have (biases, scaled RoPE, another activation or head size) are refused."""
    c = hf_config
    unsupported = []
    if getattr(c, "model_type", "llama") != "llama":
        unsupported.append(f"model_type={c.model_type!r} (a Llama is needed)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        unsupported.append("attention/MLP biases")
    if getattr(c, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={c.hidden_act!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        unsupported.append(f"head_dim={head_dim} (yoco uses hidden_size / heads)")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type={rope.get('rope_type')!r} (only plain RoPE)")
    if unsupported:
        raise ConfigError("cannot convert this Llama checkpoint: " + ", ".join(unsupported))
    return ModelConfig(arch="transformer", vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                       n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                       ffn_dim=c.intermediate_size, max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                       rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
                       rope_freqs="standard", rope_pairs="half", scale_embeddings=False,
                       tie_embeddings=bool(c.tie_word_embeddings))


def from_llama(llama) -> CausalLM:
    """A yoco Transformer with the weights of a transformers ``LlamaForCausalLM`` (a model object or
    a local folder): identical logits, the start point for ``convert_kv_heads`` and uptraining."""
    if not isinstance(llama, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        llama = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    config = llama_config(llama.config)
    param = next(llama.parameters())
    model = build_model(config, dtype=param.dtype, device=param.device)
    patterns = {}
    for i in range(config.n_layers):
        for source, target in LLAMA_NAMES.items():
            patterns[source.format(i=i)] = target.format(i=i)
    state = {}
    for name, tensor in llama.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in patterns:
            raise ConfigError(f"cannot convert this Llama checkpoint: unexpected weight {name!r}")
        state[patterns[name]] = tensor
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"cannot convert this Llama checkpoint: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()
