"""Gated retention (YOCO's gRetNet self-decoder mixer) in three equivalent forms.

Per head, with a data-dependent scalar decay gamma_t = exp(log_decay_t):

    S_t = gamma_t * S_{t-1} + k_t^T v_t,        o_t = q_t S_t

where log_decay_t = logsigmoid(x_t W_gt) / 16, RoPE is applied to q and k, and k is scaled by
d^-0.5 (no normalising denominator). The output is ``out_proj(silu(g_proj x) * RMSNorm_head(o))``
with a per-head RMSNorm without affine weight, as in the reference code.

- ``retention_parallel``: the masked decay matrix over the whole sequence (reference, for tests).
- ``retention_chunkwise``: parallel inside chunks, state carried across chunks (prefill, training).
- ``retention_recurrent``: one token at a time (decode).

All three compute in fp32, and the recurrent state is kept in fp32 whatever the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import tensor_bytes
from ..config import ModelConfig
from ..layers import Linear, RMSNorm, RotaryEmbedding, Step, decay_within_chunks, pad_to_chunks

GATE_LOGIT_NORMALIZER = 16.0


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """q, k [B, H, T, dk] (k pre-scaled), v [B, H, T, dv], log_decay [B, H, T] -> o [B, H, T, dv]."""
    q, k, v, log_decay = q.float(), k.float(), v.float(), log_decay.float()
    decay = decay_within_chunks(log_decay.cumsum(-1))  # the whole sequence as one chunk
    return ((q @ k.transpose(-1, -2)) * decay) @ v


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token; returns (o [B, H, T, dv], final state [B, H, dk, dv] fp32)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, dk, dv, dtype=torch.float32)
    q, k, v, gamma = q.float(), k.float(), v.float(), log_decay.float().exp()
    outs = []
    for t in range(T):
        # One new state tensor per token, the outer product added in place: decode at large batch is
        # bound by passes over the [B, H, dk, dv] state, so fewer temporaries is directly faster.
        state = (gamma[:, :, t, None, None] * state).addcmul_(k[:, :, t, :, None], v[:, :, t, None, :])
        outs.append(q[:, :, t, None, :] @ state)
    return torch.cat(outs, dim=-2), state


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        chunk: int, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form; any length (the tail is padded with decay 1 and zero keys: pad_to_chunks)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    q, k, v, log_decay = pad_to_chunks(chunk, q.float(), k.float(), v.float(), log_decay.float())
    n = q.shape[2] // chunk
    q, k, v = (t.view(B, H, n, chunk, -1) for t in (q, k, v))
    cum = log_decay.view(B, H, n, chunk).cumsum(-1)  # within-chunk cumulative log-decay
    intra_decay = decay_within_chunks(cum)
    out = ((q @ k.transpose(-1, -2)) * intra_decay) @ v
    # Each chunk's contribution to the state at its end, and its total decay.
    chunk_kv = (k * (cum[..., -1:] - cum).exp()[..., None]).transpose(-1, -2) @ v  # [B, H, n, dk, dv]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    if state is None:
        state = q.new_zeros(B, H, dk, dv)
    incoming, state = states_entering_chunks(chunk_kv, chunk_decay, state)
    out = out + (q * cum.exp()[..., None]) @ incoming
    return out.reshape(B, H, n * chunk, dv)[:, :, :T], state


def states_entering_chunks(chunk_kv: torch.Tensor, chunk_decay: torch.Tensor,
                           state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk [B, H, n, dk, dv] and the state after the last, from each chunk's
    contribution to the state at its end (chunk_kv [B, H, n, dk, dv]), its decay [B, H, n, 1, 1] and the
    state entering the first [B, H, dk, dv]: S_(i+1) = decay_i S_i + kv_i."""
    n = chunk_kv.shape[2]
    if torch.is_grad_enabled() and (chunk_kv.requires_grad or chunk_decay.requires_grad or state.requires_grad):
        states = []
        for i in range(n):
            states.append(state)
            state = chunk_decay[:, :, i] * state + chunk_kv[:, :, i]
        return torch.stack(states, dim=2), state
    # Without autograd each state is written once, in place, straight into the stack: one pass a chunk
    # instead of a product, a sum and the stacking copy (a 2,048-token prefill chunk of the 40m preset
    # carries 32 states of 512 KB; YOCO-gRet's 8K prefill 2.02 -> 1.93 s, the two alternated)
    incoming = chunk_kv.new_empty(chunk_kv.shape)
    incoming[:, :, 0] = state
    for i in range(1, n):
        torch.addcmul(chunk_kv[:, :, i - 1], chunk_decay[:, :, i - 1], incoming[:, :, i - 1], out=incoming[:, :, i])
    return incoming, torch.addcmul(chunk_kv[:, :, n - 1], chunk_decay[:, :, n - 1], incoming[:, :, n - 1])


class RetentionState:
    """Gated retention's recurrent state, [B, H, dk, dv] in fp32: constant in context length."""

    batch_fields = ("state",)

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, device=None):
        self.state = torch.zeros(batch_size, n_heads, head_dim, head_dim, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        return tensor_bytes(self.state)


class GatedRetention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        dim = config.dim
        self.n_heads = config.n_retention_heads
        self.head_dim = dim // self.n_heads
        self.chunk = config.retention_chunk
        self.q_proj = Linear(dim, dim, bias=False)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim, bias=False)
        self.g_proj = Linear(dim, dim, bias=False)
        self.gt_proj = Linear(dim, self.n_heads, bias=False)
        self.out_proj = Linear(dim, dim, bias=False)
        self.head_norm = RMSNorm(self.head_dim, eps=config.norm_eps, affine=False)
        self.rotary = rotary

    @classmethod
    def for_self_decoder(cls, config: ModelConfig, plain_rope) -> "GatedRetention":
        """A YOCO self-decoder layer, with plain RoPE of the retention heads' width."""
        return cls(config, plain_rope(config.dim // config.n_retention_heads))

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None = None) -> RetentionState:
        return RetentionState(batch_size, self.n_heads, self.head_dim, device=device)

    def inputs(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (RoPE'd, k scaled) and v [B, H, T, d], log-decay [B, H, T] fp32; pads made inert."""
        B, T, _ = x.shape
        cos, sin = step.rope(self.rotary)
        q = self.rotary.apply(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = self.rotary.apply(self.k_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = k * self.head_dim ** -0.5
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim)
        log_decay = F.logsigmoid(self.gt_proj(x).float()) / GATE_LOGIT_NORMALIZER  # [B, T, H]
        pad = step.pad_mask()
        if pad is not None:
            # A pad token neither writes to nor decays the state, which therefore starts at zero at
            # each row's first real token, exactly as for that row alone.
            k = k.masked_fill(pad[:, :, None, None], 0.0)
            log_decay = log_decay.masked_fill(pad[:, :, None], 0.0)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_decay.transpose(1, 2)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o.shape
        o = self.head_norm(o).transpose(1, 2).reshape(B, T, H * d).to(x.dtype)
        return self.out_proj(F.silu(self.g_proj(x)) * o)

    def forward(self, x: torch.Tensor, step: Step, cache: RetentionState | None = None) -> torch.Tensor:
        q, k, v, log_decay = self.inputs(x, step)
        state = cache.state if cache is not None else None
        if cache is not None and step.length == 1:
            o, state = retention_recurrent(q, k, v, log_decay, state)
        else:
            o, state = retention_chunkwise(q, k, v, log_decay, self.chunk, state)
        if cache is not None:
            cache.state = state
        return self.output(o, x)

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes its ``RetentionState`` holds per row: one fp32 state per head, whatever the context."""
        head_dim = config.dim // config.n_retention_heads
        return config.n_retention_heads * head_dim * head_dim * torch.float32.itemsize

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float) -> float:
        """Useful FLOPs over a chunkwise prefill of ``n`` positions: q, k, v, g, out and the gate
        projections; intra-chunk scores and values (chunk/2 keys on average), the state's update and
        readout."""
        d, heads, chunk = config.dim, config.n_retention_heads, config.retention_chunk
        head_dim = d // heads
        projections = 5 * d * d + d * heads
        mixing = n * heads * (4 * head_dim * (chunk + 1) / 2 + 4 * head_dim * head_dim)
        return 2 * projections * n + mixing

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return False  # a recurrent state: O(n)
