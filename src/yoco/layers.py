"""Building blocks shared by every architecture: RMSNorm, RoPE, SwiGLU, and the step context."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (bf16 mean-squares lose digits)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding.

    freqs="standard": inv_freq_i = theta^(-2i/d) (Llama and most models).
    freqs="linspace": inv_freq_i = theta^-(i/(d/2-1)), i.e. ``theta ** -linspace(0, 1, d/2)`` as in the
    YOCO reference code.
    pairs="half": dimension i rotates with i + d/2; pairs="interleaved": 2i rotates with 2i+1.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, freqs: str = "standard", pairs: str = "half"):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE head dim must be even, got {head_dim}")
        if freqs not in ("standard", "linspace"):
            raise ValueError(f"unknown RoPE frequencies {freqs!r}")
        if pairs not in ("half", "interleaved"):
            raise ValueError(f"unknown RoPE pairing {pairs!r}")
        self.head_dim, self.theta, self.freqs, self.pairs = head_dim, theta, freqs, pairs
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device=None) -> torch.Tensor:
        half = self.head_dim // 2
        if self.freqs == "standard":
            exponent = torch.arange(0, half, dtype=torch.float64, device=device) * 2 / self.head_dim
        else:
            exponent = torch.linspace(0, 1, half, dtype=torch.float64, device=device)
        return (self.theta ** -exponent).float()

    def reset_frequencies(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after a model was built on the meta device."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = self.frequencies(device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [..., T, 1, d/2] (fp32) for integer positions of shape [..., T]."""
        # fp64 angles: positions up to ~1M times fp32 frequencies would lose the low digits.
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        return angles.cos().float().unsqueeze(-2), angles.sin().float().unsqueeze(-2)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape [B, T, H, d]; tables broadcast over B and H."""
        x32 = x.float()
        if self.pairs == "half":
            x1, x2 = x32.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        else:
            pairs = x32.unflatten(-1, (-1, 2))
            x1, x2 = pairs[..., 0], pairs[..., 1]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)


def rotate_by(rotary: RotaryEmbedding, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys or queries x [B, h, n, d] RoPE-rotated further by ``delta`` positions (negative moves them
    back): one per row ``[B]``, or one per row and token ``[B, n]``. Compressed caches re-rotate cached
    keys with it (StreamingLLM moves its sinks, InfLLM sees far tokens at one distance)."""
    cos, sin = rotary.tables(delta[:, None] if delta.dim() == 1 else delta)  # [B, 1 or n, 1, d/2]
    return rotary.apply(x.transpose(1, 2), cos, sin).transpose(1, 2)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Step:
    """Where the tokens of one forward call sit.

    Every sequence in a batch occupies the same *slots* (0, 1, 2, ... along the cache); a row that
    was left-padded by ``pad[b]`` tokens has its first real token at slot ``pad[b]`` and RoPE
    position ``slot - pad[b]``. Pad slots are never attended to by real tokens.
    """

    start: int  # slot of the first token of this call
    length: int  # tokens in this call
    pad: torch.Tensor | None  # [B] left-pad counts, or None when no row is padded
    device: torch.device
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def slots(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length, device=self.device)

    @property
    def positions(self) -> torch.Tensor:
        """RoPE positions, [T] without padding or [B, T] with it."""
        if self.pad is None:
            return self.slots
        return (self.slots[None, :] - self.pad[:, None]).clamp_min(0)

    def pad_mask(self) -> torch.Tensor | None:
        """[B, T] True at pad tokens of this call, or None."""
        if self.pad is None:
            return None
        return self.slots[None, :] < self.pad[:, None]

    def rope(self, rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for this call, computed once per (head dim, variant) and shared by layers."""
        key = id(rotary)
        if key not in self._tables:
            self._tables[key] = rotary.tables(self.positions)
        return self._tables[key]

    def last(self, k: int) -> "Step":
        """The same call restricted to its last k tokens (for the YOCO cross-decoder's queries)."""
        return Step(self.start + self.length - k, k, self.pad, self.device)
