"""Gated DeltaNet (Yang, Kautz and Hatamizadeh, arXiv 2412.06464), a YOCO self-decoder mixer, in three
equivalent forms.

Per head, with the state S mapping keys to values (``[d_k, d_v]``, read as ``o_t = q_t S_t``):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T

the delta rule (the state's current value for k_t, ``k_t^T S``, is replaced by v_t in proportion b_t)
with a data-dependent decay a_t = exp(-exp(A_log) softplus(x W_a + dt_bias)) (Mamba-2's) and a
write strength b_t = sigmoid(x W_b). q and k are L2-normalised (so ``I - b k k^T`` never grows the
state) and q is scaled by d_k^-0.5; q, k and v pass a short causal depthwise convolution (4 taps)
and SiLU first; the output is ``out_proj(RMSNorm_head(o) * silu(x W_g))``. Values are twice as wide as
keys, and the keys ``3/4 dim`` in all: about 6 dim^2 parameters a layer, as in flash-linear-attention.

- ``deltanet_naive``: the update above, a token at a time with the matrices written out (float64
  reference, for tests).
- ``deltanet_chunkwise``: the WY / UT-transform chunk algorithm (prefill, training): inside a chunk of
  C tokens the writes ``u_t = b_t (v_t - k_t^T a_t S_{t-1})`` solve one unit lower-triangular C x C
  system, so the chunk costs matmuls, and the state is carried from chunk to chunk.
- ``deltanet_recurrent``: one token at a time as ``u_t`` and a rank-one update (decode).

The recurrent state is fp32 whatever the activation dtype; the convolution keeps its last 3 inputs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import tensor_bytes
from ..config import ModelConfig
from ..layers import Linear, RMSNorm, Step, decay_within_chunks, pad_to_chunks

VALUE_EXPANSION = 2  # value heads are twice as wide as key heads


def deltanet_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in float64: q, k [B, H, T, d_k], v [B, H, T, d_v], log_decay and beta [B, H, T];
    returns (o [B, H, T, d_v], final state [B, H, d_k, d_v])."""
    q, k, v, a, b = q.double(), k.double(), v.double(), log_decay.double().exp(), beta.double()
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state.double()
    eye = torch.eye(dk, dtype=torch.float64)
    out = []
    for t in range(T):
        kt, vt, bt = k[:, :, t], v[:, :, t], b[:, :, t, None, None]
        erase = eye - bt * kt[..., :, None] * kt[..., None, :]
        S = a[:, :, t, None, None] * (erase @ S) + bt * kt[..., :, None] * vt[..., None, :]
        out.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(out, dim=2), S


def in_fp32(form):
    """Runs a form in fp32 even under autocast: the triangular solve and the state's products compound
    rounding over a whole prompt, so bf16 matmuls there would cost more than they save."""
    @functools.wraps(form)
    def run(q: torch.Tensor, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return form(q, *args, **kwargs)
    return run


@in_fp32
def deltanet_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       beta: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token at a time (decode); returns (o [B, H, T, d_v] fp32, final state fp32)."""
    B, H, T, dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, dk, v.shape[-1], dtype=torch.float32)
    q, k, v, a, b = q.float(), k.float(), v.float(), log_decay.float().exp(), beta.float()
    outs = []
    for t in range(T):
        kt = k[:, :, t, None, :]  # [B, H, 1, d_k]
        state = a[:, :, t, None, None] * state
        # what the state now holds for k_t, replaced by v_t in proportion beta_t
        write = b[:, :, t, None, None] * (v[:, :, t, None, :] - kt @ state)  # [B, H, 1, d_v]
        state = state.addcmul_(kt.transpose(-1, -2), write)
        outs.append(q[:, :, t, None, :] @ state)
    return torch.cat(outs, dim=-2), state


@in_fp32
def deltanet_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       beta: torch.Tensor, chunk: int, state: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise form (any length: the tail is padded with zero keys, zero beta and decay 1, which leave
    the state as it is).

    In a chunk entered with state S0, with g the within-chunk cumulative log-decay, the writes U (rows
    u_t) satisfy U = diag(b) (V - diag(e^g) K S0 - L U), L[t, j] = e^(g_t - g_j) k_t.k_j for j < t:
    so (I + diag(b) L) U = diag(b) V - diag(b) diag(e^g) K S0, one triangular solve for both right-hand
    sides (U = Ut - W S0). Then O = diag(e^g) Q S0 + (causal e^(g_t - g_j) q_t.k_j) U and the state
    leaving is e^(g_C) S0 + (K e^(g_C - g))^T U."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    q, k, v, log_decay, beta = pad_to_chunks(chunk, q.float(), k.float(), v.float(), log_decay.float(), beta.float())
    n = q.shape[2] // chunk
    q, k, v = (t.reshape(B, H, n, chunk, -1) for t in (q, k, v))
    g = log_decay.reshape(B, H, n, chunk).cumsum(-1)
    b = beta.reshape(B, H, n, chunk, 1)
    decay = decay_within_chunks(g)  # j <= t
    system = (b * decay * (k @ k.transpose(-1, -2))).tril(-1) + torch.eye(chunk, device=q.device)
    solved = torch.linalg.solve_triangular(system, b * torch.cat((v, k * g.exp()[..., None]), dim=-1),
                                           upper=False, unitriangular=True)
    writes_alone, by_state = solved[..., :dv], solved[..., dv:]  # Ut and W
    scores = (q @ k.transpose(-1, -2)) * decay
    q_from_start = q * g.exp()[..., None]
    k_to_end = (k * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2)  # [B, H, n, d_k, C]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    if state is None:
        state = q.new_zeros(B, H, dk, dv)
    outs = []
    for i in range(n):
        writes = writes_alone[:, :, i] - by_state[:, :, i] @ state
        outs.append(q_from_start[:, :, i] @ state + scores[:, :, i] @ writes)
        state = chunk_decay[:, :, i] * state + k_to_end[:, :, i] @ writes
    return torch.cat(outs, dim=2)[:, :, :T], state


class DeltaNetState:
    """Gated DeltaNet's cache: the fp32 state [B, H, d_k, d_v] and the short convolution's last
    ``conv - 1`` inputs [B, conv - 1, 2 key_dim + value_dim]; constant in context length."""

    batch_fields = ("state", "conv")

    def __init__(self, batch_size: int, n_heads: int, key_dim: int, value_dim: int, conv: int, *, dtype: torch.dtype,
                 device=None):
        self.state = torch.zeros(batch_size, n_heads, key_dim, value_dim, dtype=torch.float32, device=device)
        channels = n_heads * (2 * key_dim + value_dim)  # q, k and v
        self.conv = torch.zeros(batch_size, conv - 1, channels, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return tensor_bytes(self.state, self.conv)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.n_heads = config.n_deltanet_heads
        self.key_dim = config.deltanet_key_dim  # per head
        self.value_dim = VALUE_EXPANSION * self.key_dim
        self.chunk = config.deltanet_chunk
        keys, values = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.widths = (keys, keys, values)
        self.qkv_proj = Linear(dim, 2 * keys + values, bias=False)
        # depthwise causal convolution of q, k and v: tap conv-1 multiplies the current token
        self.conv_weight = nn.Parameter(torch.empty(2 * keys + values, config.deltanet_conv))
        nn.init.uniform_(self.conv_weight, -config.deltanet_conv ** -0.5, config.deltanet_conv ** -0.5)
        self.a_proj = Linear(dim, self.n_heads, bias=False)
        self.b_proj = Linear(dim, self.n_heads, bias=False)
        # Mamba-2's decay parameters: rates A in (0, 16], time steps dt log-uniform in [1e-3, 0.1]
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1e-4, 16).log())
        dt = torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.g_proj = Linear(dim, values, bias=False)
        self.head_norm = RMSNorm(self.value_dim, eps=config.norm_eps)
        self.out_proj = Linear(values, dim, bias=False)

    @classmethod
    def for_self_decoder(cls, config: ModelConfig, plain_rope) -> "GatedDeltaNet":
        """A YOCO self-decoder layer (no RoPE: the convolution and the decay give order)."""
        return cls(config)

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None = None) -> DeltaNetState:
        return DeltaNetState(batch_size, self.n_heads, self.key_dim, self.value_dim, self.conv_weight.shape[1],
                             dtype=dtype, device=device)

    def convolve(self, x: torch.Tensor, cache: DeltaNetState | None) -> torch.Tensor:
        """The causal depthwise convolution of x [B, T, C] after the cached inputs (zeros at the start)."""
        taps = self.conv_weight.shape[1]
        before = x.new_zeros(x.shape[0], taps - 1, x.shape[2]) if cache is None else cache.conv.to(x.dtype)
        seen = torch.cat((before, x), dim=1)
        if cache is not None:  # a copy: a view would keep the whole call's inputs alive
            cache.conv = seen[:, seen.shape[1] - (taps - 1):].clone()
        T, w = x.shape[1], self.conv_weight.to(x.dtype)
        # taps summed in one fixed order, so a prompt split across calls gives the same numbers
        out = seen[:, :T] * w[:, 0]
        for i in range(1, taps):
            out = out + seen[:, i:i + T] * w[:, i]
        return out

    def inputs(self, x: torch.Tensor, step: Step, cache: DeltaNetState | None):
        """q (normalised, scaled), k (normalised), v [B, H, T, d], log-decay and beta [B, H, T] fp32."""
        B, T, _ = x.shape
        mixed = self.qkv_proj(x)
        log_decay = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        pad = step.pad_mask()
        if pad is not None:
            # A pad token neither writes nor decays the state, and enters the convolution as zero: a
            # row's state and convolution start at zero at its first real token, as for the row alone.
            mixed = mixed.masked_fill(pad[:, :, None], 0.0)
            beta = beta.masked_fill(pad[:, :, None], 0.0)
            log_decay = log_decay.masked_fill(pad[:, :, None], 0.0)
        q, k, v = F.silu(self.convolve(mixed, cache)).split(self.widths, dim=-1)
        q = F.normalize(q.view(B, T, self.n_heads, self.key_dim).float(), dim=-1, eps=1e-6) * self.key_dim ** -0.5
        k = F.normalize(k.view(B, T, self.n_heads, self.key_dim).float(), dim=-1, eps=1e-6)
        v = v.view(B, T, self.n_heads, self.value_dim)
        return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_decay.transpose(1, 2),
                beta.transpose(1, 2))

    def forward(self, x: torch.Tensor, step: Step, cache: DeltaNetState | None = None) -> torch.Tensor:
        q, k, v, log_decay, beta = self.inputs(x, step, cache)
        state = cache.state if cache is not None else None
        if cache is not None and step.length == 1:
            o, state = deltanet_recurrent(q, k, v, log_decay, beta, state)
        else:
            o, state = deltanet_chunkwise(q, k, v, log_decay, beta, self.chunk, state)
        if cache is not None:
            cache.state = state
        B, H, T, d = o.shape
        o = self.head_norm(o).transpose(1, 2).reshape(B, T, H * d).to(x.dtype)
        return self.out_proj(o * F.silu(self.g_proj(x)))

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """Bytes its ``DeltaNetState`` holds per row, whatever the context: the fp32 state of every head
        and the convolution's last inputs in the activation dtype."""
        heads, key_dim = config.n_deltanet_heads, config.deltanet_key_dim
        channels = heads * key_dim * (2 + VALUE_EXPANSION)
        return (heads * key_dim * VALUE_EXPANSION * key_dim * torch.float32.itemsize
                + (config.deltanet_conv - 1) * channels * dtype.itemsize)

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float) -> float:
        """Useful FLOPs over a chunkwise prefill of ``n`` positions: the q/k/v, gate, output, decay and
        beta projections and the convolution; in each chunk the key-key and query-key products and the
        triangular solve (t/2 earlier positions on average), the writes' readout, and the three products
        with the state (the writes' correction, the queries' readout, the state's update)."""
        d, heads, chunk, conv = config.dim, config.n_deltanet_heads, config.deltanet_chunk, config.deltanet_conv
        dk = config.deltanet_key_dim
        dv = VALUE_EXPANSION * dk
        channels = heads * (2 * dk + dv)
        projections = d * channels + 2 * d * heads * dv + 2 * d * heads
        half = (chunk + 1) / 2
        mixing = n * heads * (2 * 2 * dk * half + (dk + dv) * half + 2 * dv * half + 3 * 2 * dk * dv)
        return 2 * projections * n + 2 * conv * channels * n + mixing

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return False  # a recurrent state: O(n)
