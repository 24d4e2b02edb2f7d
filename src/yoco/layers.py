"""Building blocks shared by every architecture: RMSNorm, RoPE, SwiGLU, and the step context."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this machine's CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it, PyTorch's
    CPU matmul in bf16 runs about 4x slower than in fp32 (an Intel Xeon with AVX-512 but neither: 25
    against 106 GFLOP/s on one thread). Read from /proc/cpuinfo; elsewhere assumed (no worse than today)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return True


CPU_BF16_ARITHMETIC = cpu_has_bf16_arithmetic()
# From this many rows on, a bf16 linear on a CPU without bf16 arithmetic multiplies in fp32 (weights and
# inputs widened, the result rounded back): faster from 16 rows (4096 rows x 512 -> 1408: 45 against
# 207 ms), while a decode step's few rows stay bf16 (reading half the bytes is what they are bound by).
FP32_COMPUTE_ROWS = 16


def widens_bf16(device: torch.device) -> bool:
    """Whether bf16 products on ``device`` are faster computed in fp32: a CPU without bf16 arithmetic."""
    return device.type == "cpu" and not CPU_BF16_ARITHMETIC


def autocasting_to_bf16(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose bf16 products on a CPU without bf16
    arithmetic are computed in fp32 for calls of many rows: bf16 is then a storage format, never slower
    than fp32. Under bf16 autocast on such a CPU the operands are rounded to bf16 as autocast would
    (products of bf16 values are exact in fp32, and bf16 matmuls accumulate in fp32 too), multiplied in
    fp32 and the result rounded to bf16: autocast's result up to summation order, at fp32's speed (4x
    bf16's there), and the backward's products in fp32 as well. Everywhere else (fp32, CUDA, CPUs with
    bf16 instructions) exactly ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() >= FP32_COMPUTE_ROWS * x.shape[-1] and widens_bf16(x.device)  # a decode row: one test
                and (autocasting_to_bf16(x.device) or x.dtype == self.weight.dtype == torch.bfloat16)):
            # bf16 values (a bf16 model's, or autocast's rounding of fp32 ones) multiplied in fp32
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.bias is None else rounded_to_bf16(self.bias)
                return F.linear(rounded_to_bf16(x), rounded_to_bf16(self.weight), bias).to(torch.bfloat16)
        return F.linear(x, self.weight, self.bias)


def rounded_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x's values rounded to bf16, held in fp32."""
    return x.to(torch.bfloat16).float()


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (bf16 mean-squares lose digits)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused rms_norm (the same formula, the same result in fp32): one pass instead of six
        # operators (4,096 rows x 512: 2.5 against 6.6 ms; one decode row: 20 against 34 us)
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), x.shape[-1:], weight, self.eps).to(x.dtype)


@dataclass(frozen=True)
class RopeExtension:
    """A training-free RoPE extension by ``factor`` (ModelConfig's rope_extension fields)."""

    kind: str  # "pi", "ntk" or "yarn"
    factor: float
    original_len: int | None = None  # YaRN: the training length
    beta_fast: float = 32.0  # YaRN: frequencies turning more often than this within original_len stay
    beta_slow: float = 1.0  # YaRN: ... less often than this are interpolated by the factor

    def frequencies(self, inv_freq: torch.Tensor, exponents: torch.Tensor, theta: float,
                    top_exponent: float) -> torch.Tensor:
        """The extended frequencies (fp64) of the frequencies ``inv_freq = theta ** -exponents``, the
        largest exponent being ``top_exponent`` (given as a number: the tensors may be on the meta device)."""
        if self.kind == "pi":  # positions divided by the factor
            return inv_freq / self.factor
        if self.kind == "ntk":
            # NTK-aware: a larger base, so the fastest frequency stays and the slowest is divided by the
            # factor (theta * s^(d/(d-2)) for the standard frequencies; any schedule by its top exponent)
            if top_exponent <= 0:  # one frequency, the fastest: NTK keeps it
                return inv_freq
            return (theta * self.factor ** (1 / top_exponent)) ** -exponents
        # YaRN (Peng et al. 2023, eq. 18-19): by the number of turns r = L / wavelength a frequency makes
        # within the training length, interpolate the slow ones (r < beta_slow), keep the fast ones
        # (r > beta_fast), ramp linearly between (the paper's continuous form; transformers rounds the
        # ramp's ends to whole dims)
        turns = self.original_len * inv_freq / (2 * math.pi)
        kept = ((turns - self.beta_slow) / (self.beta_fast - self.beta_slow)).clamp(0, 1)
        return inv_freq / self.factor * (1 - kept) + inv_freq * kept

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (so q.k by its square): YaRN's sqrt(1/t) = 0.1 ln(s) + 1."""
        return 0.1 * math.log(self.factor) + 1 if self.kind == "yarn" else 1.0


@dataclass(frozen=True)
class QueryTemperature:
    """Length-dependent attention temperature: queries at position p multiplied by ``factor(p)``
    (ModelConfig's attn_temperature fields)."""

    kind: str  # "llama4" or "log"
    scale: float = 0.1
    floor_scale: int = 8192
    train_len: int | None = None

    def factor(self, positions: torch.Tensor) -> torch.Tensor:
        n = positions.to(torch.float64) + 1
        if self.kind == "llama4":  # Llama 4's NoPE layers: 1 + scale * log(floor(n / floor_scale) + 1)
            return 1 + self.scale * torch.log(torch.floor(n / self.floor_scale) + 1)
        return (n.log() / math.log(self.train_len)).clamp_min(1)  # log-n scaling beyond the training length


class RotaryEmbedding(nn.Module):
    """Rotary position embedding.

    freqs="standard": inv_freq_i = theta^(-2i/d) (Llama and most models).
    freqs="linspace": inv_freq_i = theta^-(i/(d/2-1)), i.e. ``theta ** -linspace(0, 1, d/2)`` as in the
    YOCO reference code.
    pairs="half": dimension i rotates with i + d/2; pairs="interleaved": 2i rotates with 2i+1.
    ``extension``: a training-free extension (PI, NTK-aware, YaRN); ``temperature``: a length-dependent
    factor on the queries (``queries``).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, freqs: str = "standard", pairs: str = "half",
                 extension: RopeExtension | None = None, temperature: QueryTemperature | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE head dim must be even, got {head_dim}")
        if freqs not in ("standard", "linspace"):
            raise ValueError(f"unknown RoPE frequencies {freqs!r}")
        if pairs not in ("half", "interleaved"):
            raise ValueError(f"unknown RoPE pairing {pairs!r}")
        self.head_dim, self.theta, self.freqs, self.pairs = head_dim, theta, freqs, pairs
        self.extension, self.temperature = extension, temperature
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device=None) -> torch.Tensor:
        half = self.head_dim // 2
        if self.freqs == "standard":
            exponent = torch.arange(0, half, dtype=torch.float64, device=device) * 2 / self.head_dim
        else:
            exponent = torch.linspace(0, 1, half, dtype=torch.float64, device=device)
        inv_freq = self.theta ** -exponent
        if self.extension is not None:
            top = (half - 1) * 2 / self.head_dim if self.freqs == "standard" else 1.0
            inv_freq = self.extension.frequencies(inv_freq, exponent, self.theta, top)
        return inv_freq.float()

    def reset_frequencies(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after a model was built on the meta device."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = self.frequencies(device)

    def tables(self, positions: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [..., T, 1, d/2] (fp32) for integer positions of shape [..., T]; ``scaled``:
        times YaRN's attention factor (the rotation alone without it: re-rotating cached keys)."""
        # fp64 angles: positions up to ~1M times fp32 frequencies would lose the low digits.
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        factor = self.extension.attention_factor if scaled and self.extension is not None else 1.0
        return (angles.cos() * factor).float().unsqueeze(-2), (angles.sin() * factor).float().unsqueeze(-2)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape [B, T, H, d]; tables broadcast over B and H.

        Each pair (x1, x2) is the complex number x1 + i x2 times cos + i sin: one complex product
        instead of four real ones, a subtraction, an addition and a stack over strided halves (a
        4096-token chunk's queries, 8 heads of 64: interleaved pairs 13.9 -> 1.1 ms, half pairs 7.4 ->
        4.1 ms on 2 cores). Under torch.compile the real form, which inductor fuses into one kernel (it
        generates no code for complex operators)."""
        x32 = x.float()
        if torch.compiler.is_compiling():
            x1, x2 = x32.chunk(2, dim=-1) if self.pairs == "half" else x32.unflatten(-1, (-1, 2)).unbind(-1)
            rotated = (x1 * cos - x2 * sin, x1 * sin + x2 * cos)
            out = torch.cat(rotated, dim=-1) if self.pairs == "half" else torch.stack(rotated, dim=-1).flatten(-2)
            return out.to(x.dtype)
        rotation = torch.complex(cos, sin)
        if self.pairs == "half":
            x1, x2 = x32.chunk(2, dim=-1)
            out = torch.view_as_real(torch.complex(x1, x2) * rotation).transpose(-1, -2).flatten(-2)
        else:
            pairs = x32.unflatten(-1, (-1, 2))
            if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
                pairs = pairs.contiguous()  # a complex view needs each pair adjacent and aligned
            out = torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
        return out.to(x.dtype)

    def keys(self, x: torch.Tensor, step: "Step") -> torch.Tensor:
        """Keys x [B, T, h, d] at the step's positions."""
        return self.apply(x, *step.rope(self))

    def queries(self, x: torch.Tensor, step: "Step") -> torch.Tensor:
        """Queries x [B, T, H, d] at the step's positions: rotated, and multiplied by the temperature."""
        x = self.keys(x, step)
        if self.temperature is None:
            return x
        factor = self.temperature.factor(step.positions)  # [T] or [B, T]
        return (x * factor[..., None, None].to(torch.float32)).to(x.dtype)


class NoRotation(RotaryEmbedding):
    """NoPE: keys and queries are not rotated (the attention knows order only from what the layers below
    wrote into them); its queries can still take a temperature. Stands where a RotaryEmbedding does, so
    the caches that re-rotate keys (``rotate_by``) leave them as they are."""

    def tables(self, positions: torch.Tensor, scaled: bool = True) -> tuple[None, None]:
        return None, None

    def apply(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        return x


def global_positions(config, head_dim: int) -> RotaryEmbedding:
    """How a model's global attention sees positions, from its config (``global_position``,
    ``rope_extension`` and ``attn_temperature`` fields): RoPE, possibly extended, or NoPE, either with an
    optional query temperature."""
    temperature = None if config.attn_temperature is None else QueryTemperature(
        config.attn_temperature, config.attn_scale, config.attn_floor_scale, config.attn_train_len)
    if config.global_position == "nope":
        return NoRotation(head_dim, temperature=temperature)
    extension = None if config.rope_extension is None else RopeExtension(
        config.rope_extension, config.rope_factor, config.rope_original_len, config.yarn_beta_fast, config.yarn_beta_slow)
    return RotaryEmbedding(head_dim, config.rope_theta, config.rope_freqs, config.rope_pairs, extension, temperature)


def rotate_by(rotary: RotaryEmbedding, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys or queries x [B, h, n, d] RoPE-rotated further by ``delta`` positions (negative moves them
    back): one per row ``[B]``, or one per row and token ``[B, n]``. Compressed caches re-rotate cached
    keys with it (StreamingLLM moves its sinks, InfLLM sees far tokens at one distance)."""
    cos, sin = rotary.tables(delta[:, None] if delta.dim() == 1 else delta, scaled=False)  # [B, 1 or n, 1, d/2]
    return rotary.apply(x.transpose(1, 2), cos, sin).transpose(1, 2)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if gate.requires_grad:
            return self.down_proj(F.silu(gate) * self.up_proj(x))
        # without autograd, in place: two fewer [T, hidden] temporaries (the largest activations)
        return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x)))


def pad_to_chunks(chunk: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors whose dim 2 is time ([B, H, T, ...]), zero-padded there to a whole number of chunks: what
    the chunkwise forms of the recurrent mixers run on. Their padded tail is inert: zero keys write
    nothing (as does a zero write strength) and log-decay 0 keeps the state."""
    extra = (-tensors[0].shape[2]) % chunk
    if not extra:
        return tensors
    return tuple(F.pad(t, (0, 0) * (t.dim() - 3) + (0, extra)) for t in tensors)


def decay_within_chunks(cum_log_decay: torch.Tensor) -> torch.Tensor:
    """[..., C] cumulative log-decays within each chunk -> [..., C, C]: exp(cum_t - cum_j) for j <= t, and
    0 above the diagonal (a position never sees a later one)."""
    C = cum_log_decay.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=cum_log_decay.device).tril()
    return (cum_log_decay[..., :, None] - cum_log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()


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
    # The call writes no cache (a training or scoring forward), so a block may recompute its activations
    # in backward (activation checkpointing) without writing anything twice.
    cache_free: bool = False
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
        return Step(self.start + self.length - k, k, self.pad, self.device, self.cache_free)
