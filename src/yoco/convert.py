"""Model surgery: turning one architecture's weights into another's starting point."""

from __future__ import annotations

import math

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


def llama_config_of(config: ModelConfig, attn_implementation: str = "sdpa"):
    """The transformers ``LlamaConfig`` of a yoco Transformer's dimensions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, attn_implementation=attn_implementation)


def to_llama(model: CausalLM, eos_token_id: int | None = None):
    """A transformers ``LlamaForCausalLM`` computing what a yoco Transformer computes (the same logits):
    a model for the tools that take a Llama folder (kvpress, lm-eval's hf model, vLLM). What a Llama
    cannot express is refused: another attention or position scheme, a window, shared K/V layers, and
    scaled embeddings under tied weights (the scale is folded into the embedding, which the head reads)."""
    from transformers import LlamaForCausalLM

    c = model.config
    unsupported = []
    if c.arch != "transformer" or c.attention != "gqa":
        unsupported.append(f"arch={c.arch} attention={c.attention} (a GQA transformer is needed)")
    if c.window is not None:
        unsupported.append(f"window={c.window}")
    if len(set(c.kv_sources)) != c.n_layers:
        unsupported.append("K/V shared across layers")
    if (c.global_position, c.rope_freqs, c.rope_pairs, c.rope_extension, c.attn_temperature) != (
            "rope", "standard", "half", None, None):
        unsupported.append("positions other than plain RoPE (standard frequencies, half-split pairs)")
    if c.scale_embeddings and c.tie_embeddings:
        unsupported.append("scaled embeddings tied to the head")
    if unsupported:
        raise ConfigError("cannot write this model as a Llama: " + ", ".join(unsupported))
    hf_config = llama_config_of(c)
    hf_config.eos_token_id = eos_token_id
    param = next(model.parameters())
    llama = LlamaForCausalLM(hf_config).to(dtype=param.dtype, device=param.device).eval()
    names = {target.format(i=i): source.format(i=i) for i in range(c.n_layers) for source, target in LLAMA_NAMES.items()}
    state = {names[name]: tensor for name, tensor in model.state_dict().items()}
    if c.scale_embeddings:
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * math.sqrt(c.dim)
    load_weights(llama, state, c.tie_embeddings, "cannot write this model as a Llama")
    return llama


def load_weights(model: torch.nn.Module, state: dict, tied: bool, refusal: str) -> None:
    """Load renamed weights into ``model`` (a tied head is the embedding's: not loaded), or refuse with
    what is missing and unexpected."""
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{refusal}: missing {missing[:4]}, unexpected {unexpected[:4]}")


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
    load_weights(model, state, config.tie_embeddings, "cannot convert this Llama checkpoint")
    return model.eval()
