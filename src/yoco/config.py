"""Model configuration: one dataclass for every architecture, validated on construction.

Architectures (the names used by the CLI, presets and results):

- ``transformer``: a pre-norm GQA decoder (optionally sliding-window in every layer).
- ``yoco-swa``: YOCO with a sliding-window-attention self-decoder.
- ``yoco-gret``: YOCO with a gated-retention self-decoder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("transformer", "yoco-swa", "yoco-gret")
ROPE_FREQS = ("standard", "linspace")
ROPE_PAIRS = ("half", "interleaved")


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the reason."""


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
    # Sliding window (positions each query sees, itself included). Used by yoco-swa's self-decoder
    # and, when set for `transformer`, by every layer (the "window only" control).
    window: int | None = None
    # YOCO: number of self-decoder layers (the split point); None means n_layers // 2.
    n_self_layers: int | None = None
    # Gated retention heads (self-decoder of yoco-gret); None means dim // 256 (head dim 256, the
    # reference default), at least 1.
    retention_heads: int | None = None
    retention_chunk: int = 64
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
    def n_retention_heads(self) -> int:
        return self.retention_heads if self.retention_heads is not None else max(1, self.dim // 256)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        if self.arch not in ARCHITECTURES:
            raise bad("arch", f"unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                     "retention_chunk"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("window", "n_self_layers", "retention_heads"):  # optional integers
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                raise bad(name, "must be an integer or None")
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
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be positive")
        if self.window is not None and self.window < 1:
            raise bad("window", "must be a positive integer (positions each query sees, itself included)")
        if self.arch == "yoco-swa" and self.window is None:
            raise bad("window", "yoco-swa needs a sliding window size")
        if self.arch == "yoco-gret" and self.window is not None:
            raise bad("window", "yoco-gret has no sliding window (its self-decoder is gated retention)")
        if self.is_yoco:
            if self.n_layers < 2:
                raise bad("n_layers", "YOCO needs at least 2 layers (a self-decoder and a cross-decoder)")
            if not 1 <= self.self_layers <= self.n_layers - 1:
                raise bad("n_self_layers", f"must be within 1..n_layers-1 = 1..{self.n_layers - 1}")
        elif self.n_self_layers is not None:
            raise bad("n_self_layers", f"only YOCO architectures have a self-decoder, not {self.arch}")
        if self.retention_heads is not None:
            if self.arch != "yoco-gret":
                raise bad("retention_heads", f"only yoco-gret uses gated retention, not {self.arch}")
            if self.retention_heads < 1 or self.dim % self.retention_heads:
                raise bad("retention_heads", f"must be a positive divisor of dim={self.dim}")
        if self.arch == "yoco-gret" and (self.dim // self.n_retention_heads) % 2:
            raise bad("retention_heads", "retention head dim must be even for RoPE")

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
                 max_seq_len=1024, window=16, retention_heads=2, retention_chunk=16),
    # The ~40M-parameter benchmark pair: width 512, 12 layers, 8 query / 2 KV heads, SwiGLU 1408.
    "40m": dict(vocab_size=4096, dim=512, n_layers=12, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                max_seq_len=1 << 20, window=1024, retention_heads=2, retention_chunk=64),
}
# The YOCO reference's RoPE: interleaved pairs, linspace frequencies.
YOCO_ROPE = dict(rope_freqs="linspace", rope_pairs="interleaved")


def get_config(arch: str, preset: str = "tiny", **overrides: Any) -> ModelConfig:
    """The named preset's config for `arch`; `overrides` replace any field."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    values = dict(PRESETS[preset], arch=arch)
    if arch != "yoco-gret":
        values.pop("retention_heads")
    if arch == "yoco-gret":
        values.pop("window")
    if arch == "transformer":
        values.pop("window")  # full attention unless asked for the window-only control
    if arch.startswith("yoco-"):
        values.update(YOCO_ROPE)
    values.update(overrides)
    return ModelConfig(**values)


__all__ = ["ARCHITECTURES", "ConfigError", "ModelConfig", "PRESETS", "get_config"]
