"""Model configuration: one dataclass for every architecture, validated on construction.

Architectures (the names used by the CLI, presets and results):

- ``transformer``: a pre-norm GQA decoder (optionally sliding-window in every layer).
- ``yoco-swa``: YOCO with a sliding-window-attention self-decoder.
- ``yoco-gret``: YOCO with a gated-retention self-decoder.
- ``yoco-gdn``: YOCO with a gated-DeltaNet self-decoder.
- ``block``: the Block Transformer.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import YocoError

ARCHITECTURES = ("transformer", "yoco-swa", "yoco-gret", "yoco-gdn", "block")
ATTENTIONS = ("gqa", "mla")
ROPE_FREQS = ("standard", "linspace")
ROPE_PAIRS = ("half", "interleaved")
GLOBAL_POSITIONS = ("rope", "nope")
ROPE_EXTENSIONS = ("pi", "ntk", "yarn")
ATTN_TEMPERATURES = ("llama4", "log")
# The fields that say how the global attention sees positions (and hold no weights).
POSITION_FIELDS = ("global_position", "rope_extension", "rope_factor", "rope_original_len", "yarn_beta_fast",
                   "yarn_beta_slow", "attn_temperature", "attn_scale", "attn_floor_scale", "attn_train_len")


class ConfigError(YocoError, ValueError):
    """An invalid configuration; the message names the field and the reason."""


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _has_type(value, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int to Python, never to a config
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))  # JSON writes 10000.0 as 10000
    return isinstance(value, kind)


@dataclass
class ModelConfig:
    arch: str = "transformer"
    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_dim: int = 1408
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    # RoPE. "standard" is theta^(-2i/d); "linspace" is the YOCO reference's theta^-linspace(0, 1, d/2).
    rope_theta: float = 10000.0
    rope_freqs: str = "standard"
    rope_pairs: str = "half"
    # How the global attention sees positions (YOCO's global K/V and cross-decoder queries; every layer
    # of the Transformer): "rope", or "nope" (no rotation: a YOCO self-decoder keeps its RoPE, so the
    # model still knows order, as in SWAN-GPT and Llama 4's interleaved NoPE layers).
    global_position: str = "rope"
    # Training-free RoPE extension of the global attention: "pi" (positions divided by rope_factor),
    # "ntk" (NTK-aware: theta raised so the slowest frequency is divided by rope_factor) or "yarn"
    # (per-frequency interpolation by how often it turns within rope_original_len, and logits scaled
    # by (0.1 ln rope_factor + 1)^2).
    rope_extension: str | None = None
    rope_factor: float = 1.0
    rope_original_len: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # Length-dependent attention temperature of the global queries: "llama4" multiplies them by
    # 1 + attn_scale * log(floor((pos + 1) / attn_floor_scale) + 1); "log" by
    # max(1, log(pos + 1) / log(attn_train_len)).
    attn_temperature: str | None = None
    attn_scale: float = 0.1
    attn_floor_scale: int = 8192
    attn_train_len: int | None = None
    # Sliding window (positions each query sees, itself included). Used by yoco-swa's self-decoder
    # and, when set for `transformer`, by every layer (the "window only" control).
    window: int | None = None
    # YOCO: number of self-decoder layers (the split point); None means n_layers // 2.
    n_self_layers: int | None = None
    # Gated retention heads (self-decoder of yoco-gret); None means dim // 256 (head dim 256, the
    # reference default), at least 1.
    retention_heads: int | None = None
    retention_chunk: int = 64
    # Gated DeltaNet heads (self-decoder of yoco-gdn): keys 3/4 of dim in all, values twice as wide;
    # None means heads of 128 keys (at least 1). Its chunk length and short convolution's taps.
    deltanet_heads: int | None = None
    deltanet_chunk: int = 64
    deltanet_conv: int = 4
    # Transformer attention: "gqa" (MHA, GQA or MQA by n_kv_heads) or "mla" (multi-head latent
    # attention, DeepSeek-V2): a latent of rank mla_kv_rank plus one decoupled RoPE key of
    # mla_rope_dim shared by all heads is all the cache holds; mla_q_rank adds a low-rank query.
    attention: str = "gqa"
    mla_kv_rank: int = 128
    mla_rope_dim: int = 32
    mla_q_rank: int | None = None
    # Cross-layer K/V sharing (Transformer): CLA with factor s (layers 0, s, 2s, ... produce K/V, the
    # next s-1 layers reuse it) or MLKV with mlkv_layers producing layers (indices [0] +
    # [int((i+1) L / L_kv)]), every other layer reusing the most recent producer's K/V.
    cla_factor: int = 1
    mlkv_layers: int | None = None
    # Block Transformer: block length, prefix tokens the token decoder gets from the previous block's
    # context embedding (expansion ratio), and the block decoder's depth (None: n_layers // 2; the
    # token decoder has the rest).
    block_len: int = 4
    block_prefix: int = 2
    block_layers: int | None = None
    # Embedding: x = sqrt(dim) * embed(tokens) as in the YOCO reference; False for Llama-style.
    scale_embeddings: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_yoco(self) -> bool:
        return self.arch.startswith("yoco-")

    @property
    def self_layers(self) -> int:
        """Self-decoder depth of a YOCO model (0 for the Transformer)."""
        if not self.is_yoco:
            return 0
        return self.n_self_layers if self.n_self_layers is not None else self.n_layers // 2

    @property
    def kv_sources(self) -> list[int]:
        """For each Transformer layer, the layer whose K/V (or MLA latent) it reads: itself for a
        producing layer, an earlier producer under CLA or MLKV. One mechanism for both."""
        L = self.n_layers
        if self.mlkv_layers is not None:
            producers = sorted({0} | {int((i + 1) * L / self.mlkv_layers) for i in range(self.mlkv_layers - 1)})
        else:
            producers = list(range(0, L, self.cla_factor))
        return [max(p for p in producers if p <= i) for i in range(L)]

    @property
    def n_retention_heads(self) -> int:
        return self.retention_heads if self.retention_heads is not None else max(1, self.dim // 256)

    @property
    def n_deltanet_heads(self) -> int:
        return self.deltanet_heads if self.deltanet_heads is not None else max(1, 3 * self.dim // 4 // 128)

    @property
    def deltanet_key_dim(self) -> int:
        """Key width of a gated DeltaNet head (its values are twice as wide)."""
        return 3 * self.dim // 4 // self.n_deltanet_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        self.check_types()
        if self.arch not in ARCHITECTURES:
            raise bad("arch", f"unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                     "retention_chunk", "deltanet_chunk", "mla_kv_rank", "mla_rope_dim", "cla_factor", "block_len", "block_prefix"):
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.dim % self.n_heads:
            raise bad("n_heads", f"must divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise bad("n_heads", f"head dim dim/n_heads={self.head_dim} must be even for RoPE")
        if self.rope_freqs not in ROPE_FREQS:
            raise bad("rope_freqs", f"choose one of {', '.join(ROPE_FREQS)}")
        if self.rope_pairs not in ROPE_PAIRS:
            raise bad("rope_pairs", f"choose one of {', '.join(ROPE_PAIRS)}")
        if not self.rope_theta > 0:
            raise bad("rope_theta", "must be positive")
        self.validate_positions(bad)
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be positive")
        if self.window is not None and self.window < 1:
            raise bad("window", "must be a positive integer (positions each query sees, itself included)")
        if self.arch == "yoco-swa" and self.window is None:
            raise bad("window", "yoco-swa needs a sliding window size")
        if self.is_yoco and self.window is not None and "window" not in PRESET_USE[self.arch]["takes"]:
            raise bad("window", f"{self.arch} has no sliding window (its self-decoder is not windowed attention)")
        for name in ARCH_OWN_FIELDS:
            users = [arch for arch, use in PRESET_USE.items() if name in use["takes"]]
            if name != "window" and getattr(self, name) is not None and self.arch not in users:
                raise bad(name, f"only {', '.join(users)} take it, not {self.arch}")
        if self.is_yoco:
            if self.n_layers < 2:
                raise bad("n_layers", "YOCO needs at least 2 layers (a self-decoder and a cross-decoder)")
            if not 1 <= self.self_layers <= self.n_layers - 1:
                raise bad("n_self_layers", f"must be within 1..n_layers-1 = 1..{self.n_layers - 1}")
        elif self.n_self_layers is not None:
            raise bad("n_self_layers", f"only YOCO architectures have a self-decoder, not {self.arch}")
        if self.retention_heads is not None and (self.retention_heads < 1 or self.dim % self.retention_heads):
            raise bad("retention_heads", f"must be a positive divisor of dim={self.dim}")
        if self.deltanet_heads is not None and (self.deltanet_heads < 1 or 3 * self.dim % (4 * self.deltanet_heads)):
            raise bad("deltanet_heads", f"must be a positive divisor of the key width 3/4 dim={3 * self.dim / 4:g}")
        if self.arch == "yoco-gdn" and 3 * self.dim % 4:
            raise bad("dim", "yoco-gdn's keys are 3/4 of dim: dim must be a multiple of 4")
        if self.deltanet_conv < 2:
            raise bad("deltanet_conv", "the short convolution needs at least 2 taps")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"choose one of {', '.join(ATTENTIONS)}")
        if self.attention == "mla":
            if self.arch != "transformer":
                raise bad("attention", f"MLA is a Transformer attention, not available for {self.arch}")
            if self.window is not None:
                raise bad("attention", "MLA with a sliding window is not supported (set window=None)")
            if self.mla_rope_dim % 2:
                raise bad("mla_rope_dim", "the decoupled RoPE key dimension d_R must be even")
            if self.mla_q_rank is not None and self.mla_q_rank < 1:
                raise bad("mla_q_rank", "must be a positive integer or None")
        if self.cla_factor > 1 or self.mlkv_layers is not None:
            if self.arch != "transformer":
                raise bad("cla_factor" if self.cla_factor > 1 else "mlkv_layers",
                          f"cross-layer K/V sharing is for the Transformer, not {self.arch}")
            if self.window is not None:
                raise bad("window", "cross-layer K/V sharing needs full attention (window=None)")
        if self.n_layers % self.cla_factor:
            raise bad("cla_factor", f"the CLA sharing factor must divide n_layers={self.n_layers}")
        if self.mlkv_layers is not None:
            if self.cla_factor > 1:
                raise bad("mlkv_layers", "choose CLA (cla_factor) or MLKV (mlkv_layers), not both")
            if not 1 <= self.mlkv_layers <= self.n_layers:
                raise bad("mlkv_layers", f"must be within 1..n_layers = 1..{self.n_layers}")
        if self.arch == "block":
            if self.dim % self.block_len:
                raise bad("block_len", f"must divide dim={self.dim} (a block embedding concatenates block_len "
                                       "token embeddings of width dim/block_len)")
            depth = self.block_layers if self.block_layers is not None else self.n_layers // 2
            if not 1 <= depth <= self.n_layers - 1:
                raise bad("block_layers", f"must be within 1..n_layers-1 = 1..{self.n_layers - 1}")
            if self.window is not None:
                raise bad("window", "the Block Transformer has no sliding window")
        elif self.block_layers is not None:
            raise bad("block_layers", f"only the Block Transformer has a block decoder, not {self.arch}")
        if self.arch == "yoco-gret" and (self.dim // self.n_retention_heads) % 2:
            raise bad("retention_heads", "retention head dim must be even for RoPE")

    def validate_positions(self, bad) -> None:
        if self.global_position not in GLOBAL_POSITIONS:
            raise bad("global_position", f"choose one of {', '.join(GLOBAL_POSITIONS)}")
        if self.rope_extension is not None:
            if self.rope_extension not in ROPE_EXTENSIONS:
                raise bad("rope_extension", f"choose one of {', '.join(ROPE_EXTENSIONS)}, or null")
            if self.global_position == "nope":
                raise bad("rope_extension", "extends RoPE, and global_position='nope' has none")
            if not self.rope_factor > 1:
                raise bad("rope_factor", "a RoPE extension needs a factor above 1")
        elif self.rope_factor != 1:
            raise bad("rope_factor", "is used by rope_extension only (set rope_extension, or leave it 1)")
        if self.rope_extension == "yarn":
            if self.rope_original_len is None or self.rope_original_len < 1:
                raise bad("rope_original_len", "YaRN needs the training length (a positive integer)")
            if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
                raise bad("yarn_beta_slow", f"must satisfy 0 < yarn_beta_slow < yarn_beta_fast={self.yarn_beta_fast}")
        elif self.rope_original_len is not None:
            raise bad("rope_original_len", "is used by rope_extension='yarn' only")
        if self.attn_temperature is not None:
            if self.attn_temperature not in ATTN_TEMPERATURES:
                raise bad("attn_temperature", f"choose one of {', '.join(ATTN_TEMPERATURES)}, or null")
            if self.attn_temperature == "llama4":
                if not self.attn_scale > 0:
                    raise bad("attn_scale", "must be positive")
                if self.attn_floor_scale < 1:
                    raise bad("attn_floor_scale", "must be a positive integer")
            if self.attn_temperature == "log" and (self.attn_train_len is None or self.attn_train_len < 2):
                raise bad("attn_train_len", "the log temperature needs the training length (an integer >= 2)")
        elif self.attn_train_len is not None:
            raise bad("attn_train_len", "is used by attn_temperature='log' only")
        if self.positions_changed and (self.attention == "mla" or self.arch == "block"):
            raise bad("global_position" if self.global_position != "rope" else
                      "rope_extension" if self.rope_extension else "attn_temperature",
                      f"position options are for YOCO's global attention and the GQA Transformer, not "
                      f"{'MLA' if self.attention == 'mla' else 'the Block Transformer'}")

    @property
    def positions_changed(self) -> bool:
        """Whether the global attention's positions differ from plain RoPE."""
        return self.global_position != "rope" or self.rope_extension is not None or self.attn_temperature is not None

    def check_types(self) -> None:
        """Every field holds a value of its declared type, named when it does not: a config.json with
        ``"rope_theta": "1e4"`` or ``"tie_embeddings": "false"`` (a string, which Python would read as
        true) is refused here, not misread or blamed on the weights later."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if not any(_has_type(value, t) for t in allowed):
                raise ConfigError(f"invalid config: {f.name}={value!r}: must be "
                                  f"{' or '.join(TYPE_NAMES[t] for t in allowed)}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"invalid config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
# Each preset is a dict of shared dimensions; `get_config` adds what each architecture needs.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: small enough that a full forward is milliseconds.
    "tiny": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=1024, window=16, retention_heads=2, retention_chunk=16, deltanet_heads=2,
                 deltanet_chunk=16, mla_kv_rank=24, mla_rope_dim=8),
    # For studies on a CPU: a ~1.6M-parameter model that trains at thousands of tokens/s, with a
    # window (128) wide enough for a passkey needle and question.
    "small": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=4096,
                  window=128, retention_heads=1, retention_chunk=64, deltanet_heads=1, mla_kv_rank=48,
                  mla_rope_dim=16),
    # The ~40M-parameter benchmark pair: width 512, 12 layers, 8 query / 2 KV heads, SwiGLU 1408.
    "40m": dict(vocab_size=4096, dim=512, n_layers=12, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                max_seq_len=1 << 20, window=1024, retention_heads=2, retention_chunk=64, deltanet_heads=3, mla_kv_rank=128,
                mla_rope_dim=32),
}
# The YOCO reference's RoPE: interleaved pairs, linspace frequencies.
YOCO_ROPE = dict(rope_freqs="linspace", rope_pairs="interleaved")

# Preset fields only some architectures take (the others keep the field's default: no window, no
# retention heads), and which take them; and each architecture's RoPE. The Transformer and the Block
# Transformer attend fully unless asked for the window-only control (the "swa" variant).
ARCH_OWN_FIELDS = ("window", "retention_heads", "deltanet_heads")
PRESET_USE: dict[str, dict[str, Any]] = {
    "transformer": dict(takes=(), rope={}),
    "yoco-swa": dict(takes=("window",), rope=YOCO_ROPE),
    "yoco-gret": dict(takes=("retention_heads",), rope=YOCO_ROPE),
    "yoco-gdn": dict(takes=("deltanet_heads",), rope=YOCO_ROPE),
    "block": dict(takes=(), rope={}),
}


# Named members of the KV-reduction family: an architecture plus the fields that make it (applied on
# top of a preset). "n_kv_heads": "n_heads" means as many KV heads as query heads.
VARIANTS: dict[str, dict[str, Any]] = {
    "mha": dict(arch="transformer", n_kv_heads="n_heads"),
    "gqa": dict(arch="transformer"),
    "mqa": dict(arch="transformer", n_kv_heads=1),
    "mla": dict(arch="transformer", attention="mla"),
    "cla2": dict(arch="transformer", cla_factor=2),
    "mqa-cla2": dict(arch="transformer", n_kv_heads=1, cla_factor=2),
    "mlkv": dict(arch="transformer", mlkv_layers="n_layers/3"),
    # The window-only control: the preset's sliding window in every layer, no global cache at all.
    "swa": dict(arch="transformer", window="preset"),
}
NAMES = ARCHITECTURES + tuple(VARIANTS)


def get_config(arch: str, preset: str = "tiny", **overrides: Any) -> ModelConfig:
    """The named preset's config for an architecture or a named variant (``NAMES``); `overrides`
    replace any field."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if arch not in NAMES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(NAMES)}")
    if arch in VARIANTS:
        variant = dict(VARIANTS[arch])
        base = get_config(variant.pop("arch"), preset)
        if variant.get("n_kv_heads") == "n_heads":
            variant["n_kv_heads"] = base.n_heads
        if variant.get("window") == "preset":
            variant["window"] = PRESETS[preset]["window"]
        if variant.get("mlkv_layers") == "n_layers/3":
            variant["mlkv_layers"] = max(1, base.n_layers // 3)
        return base.replace(**{**variant, **overrides})
    values = dict(PRESETS[preset], arch=arch, **PRESET_USE[arch]["rope"])
    for name in ARCH_OWN_FIELDS:
        if name not in PRESET_USE[arch]["takes"]:
            values.pop(name)
    values.update(overrides)
    return ModelConfig(**values)


__all__ = ["ARCHITECTURES", "ConfigError", "ModelConfig", "NAMES", "POSITION_FIELDS", "PRESETS", "VARIANTS",
           "get_config"]
