"""Multi-head latent attention (MLA, DeepSeek-V2) with a latent-only cache and absorbed decode.

Per token the producing layer computes a normed latent ``c = RMSNorm(W_dkv x)`` of size d_c and one
decoupled RoPE key ``k_R = RoPE(W_kr x)`` of size d_R shared by every head; the two are stored side by
side in ONE buffer ``[B, S, d_c + d_R]`` (``LatentCache``). Nothing decompressed is ever cached.

Head h attends with key ``[W_uk_h c ; k_R]`` and value ``W_uv_h c``; its query is
``[q_nope_h ; RoPE(q_rope_h)]``; the softmax scale is 1/sqrt(d_nope + d_R).

Two equivalent ways to compute it:

- decompressed (prefill / training): build per-head K and V from the latent and run SDPA;
- weight-absorbed (decode): ``q_nope_h . (W_uk_h c) = (W_uk_h^T q_nope_h) . c``, so each head's query
  is mapped into latent space and attention becomes an MQA over the cache buffer itself (keys = the
  ``[c ; k_R]`` rows, values = the ``c`` part), after which each head's weighted latent is
  up-projected with W_uv_h. Per decoded token this reads the cache once instead of decompressing it.
  W_uk and W_uv are k_up's and v_up's effective maps (``effective_linear``), so an adapter on those
  modules (LoRA, hooks, parametrizations) acts on both paths alike.

Cross-layer sharing: a layer whose ``kv_source`` differs from its own index is a consumer: it has no
latent projections and reads the producer's latent from the ``shared`` dict of the same call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..cache import CacheError, CallKV, Expand, KVGeometry, SlotCache, attend_in_slot_order
from ..config import ModelConfig
from ..layers import Linear, RMSNorm, RotaryEmbedding, Step, rotate_by
from .attention import visible_pairs


class LatentCache(SlotCache):
    """The normed latent and the RoPE'd decoupled key of every position, ``kv`` [B, capacity, d_c + d_R]
    (latent in ``[..., :d_c]``, rope key in ``[..., d_c:]``), written by slot; preallocated or doubling
    like every ``SlotCache``."""

    batch_fields = ("kv",)
    slot_dim = 1
    kind = "latent cache"

    def __init__(self, batch_size: int, latent_dim: int, rope_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, capacity: int | None = None):
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        super().__init__({"kv": (batch_size, None, latent_dim + rope_dim)}, dtype=dtype, device=device,
                         capacity=capacity)

    def append(self, latent_and_rope: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """Write [B, T, d_c + d_R] (or, as every attention cache takes its rows, [B, 1, T, d_c + d_R]:
        one "K/V head" whose rows are keys and values) at the next T slots; return a view
        [B, length, d_c + d_R] of all slots."""
        if latent_and_rope.dim() == 4 and latent_and_rope.shape[1] == 1:
            latent_and_rope = latent_and_rope[:, 0]
        if (v is not None or latent_and_rope.dim() != 3 or latent_and_rope.shape[-1] != self.kv.shape[-1]
                or latent_and_rope.shape[0] != self.kv.shape[0]):
            raise CacheError(f"latent cache rows are [{self.kv.shape[0]}, T, {self.kv.shape[-1]}], "
                             f"got {list(latent_and_rope.shape)}")
        return super().append(latent_and_rope)[0]

    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """Queries over the rows of slots 0..length-1 as one K/V head (keys and values at once), or
        over the per-head keys and values ``expand`` makes of them."""
        if self.length != step.start + step.length:
            raise ValueError(f"latent holds {self.length} positions; this call ends at slot "
                             f"{step.start + step.length}")
        return attend_in_slot_order(q, self.kv[:, None, : self.length], None, step, scale, expand)


def effective_linear(module: nn.Module, in_features: int,
                     like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) of the map ``module`` applies to inputs of ``in_features``.

    The absorbed paths fold k_up / v_up into the queries and the weighted latents, so they need these
    matrices rather than a call of the module. A module whose forward is ``nn.Linear``'s with no hooks
    gives them as its ``weight`` and ``bias`` (a parametrized weight is evaluated by reading it): the
    fast path. Anything else (a peft LoRA layer, a hand-written adapter, a forward hook, an old-style
    ``weight_norm`` pre-hook) may change what the module computes, and reading ``weight`` would silently
    drop that change; so the module is applied to the identity and to zero, in ``like``'s dtype and
    device: ``module(0)`` is the bias and ``module(I) - module(0)`` the transposed weight, exact for
    every affine module (a non-affine one has no absorbed form)."""
    if computes_plain_linear(module):
        return module.weight, module.bias
    probe = torch.cat((torch.zeros(1, in_features, dtype=like.dtype, device=like.device),
                       torch.eye(in_features, dtype=like.dtype, device=like.device)))
    out = module(probe)
    bias = out[0]
    return (out[1:] - bias).T, bias


def computes_plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` computes ``F.linear(x, module.weight, module.bias)`` (``layers.Linear``
    does, in fp32 for many bf16 rows on a CPU without bf16 arithmetic)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, _global_forward_hooks, _global_forward_pre_hooks)
    plain = type(module).forward in (nn.Linear.forward, Linear.forward)
    return isinstance(module, nn.Linear) and plain and not any(hooks)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA self-attention. ``rotary`` has head dim d_R (``config.mla_rope_dim``).

    ``absorb``: None picks the absorbed path for single-token calls that read a cached or shared latent
    and the decompressed path otherwise; True/False force one path (both give the same result). Either
    way the mixer only calls its cache's ``attend``: latent-space queries over the rows themselves
    (absorbed), or per-head queries with ``expand=self.decompressed`` (the cache decompresses the rows
    it attends: all of them for a plain cache, the kept ones for a compressed cache).
    """

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer: int = 0,
                 kv_source: int | None = None):
        super().__init__()
        self.layer = layer
        self.kv_source = layer if kv_source is None else kv_source
        if self.kv_source > layer:
            raise ValueError(f"layer {layer} cannot read the latent of later layer {self.kv_source}")
        self.n_heads = H = config.n_heads
        self.d_nope = self.d_v = config.head_dim
        self.d_c, self.d_R = config.mla_kv_rank, config.mla_rope_dim
        if rotary.head_dim != self.d_R:
            raise ValueError(f"MLA needs a rotary embedding of head dim mla_rope_dim={self.d_R}, "
                             f"got {rotary.head_dim}")
        self.rotary = rotary
        self.scale = (self.d_nope + self.d_R) ** -0.5
        self.absorb: bool | None = None
        dim, q_out = config.dim, H * (self.d_nope + self.d_R)
        if self.is_producer:
            self.kv_down = Linear(dim, self.d_c, bias=False)
            self.kv_norm = RMSNorm(self.d_c, config.norm_eps)
            self.k_rope = Linear(dim, self.d_R, bias=False)
        if config.mla_q_rank is None:
            self.q_proj = Linear(dim, q_out, bias=False)
        else:
            self.q_down = Linear(dim, config.mla_q_rank, bias=False)
            self.q_norm = RMSNorm(config.mla_q_rank, config.norm_eps)
            self.q_up = Linear(config.mla_q_rank, q_out, bias=False)
        self.k_up = Linear(self.d_c, H * self.d_nope, bias=False)
        self.v_up = Linear(self.d_c, H * self.d_v, bias=False)
        self.o_proj = Linear(H * self.d_v, dim, bias=False)

    @property
    def is_producer(self) -> bool:
        return self.kv_source == self.layer

    def new_cache(self, batch_size: int, *, dtype: torch.dtype, device, capacity: int | None) -> LatentCache:
        if not self.is_producer:
            raise CacheError(f"MLA layer {self.layer} reads layer {self.kv_source}'s latent and owns no cache")
        return LatentCache(batch_size, self.d_c, self.d_R, dtype=dtype, device=device, capacity=capacity)

    def kv_geometry(self) -> KVGeometry:
        """The latent rows as one "K/V head" whose rows are keys and values; re-rotation (StreamingLLM,
        InfLLM) turns only the rope-key part, the last d_R dimensions (of a row, of a decompressed key
        or of a query alike)."""
        d_R = self.d_R

        def rotate(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            return torch.cat((rows[..., :-d_R], rotate_by(self.rotary, rows[..., -d_R:], delta)), dim=-1)

        return KVGeometry(1, self.d_c + d_R, self.d_c + d_R, rotate=rotate, values_are_keys=True)

    # ------------------------------------------------------------------ pieces
    def latent(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """This call's [c ; RoPE(k_R)], [B, T, d_c + d_R] (producer only)."""
        B, T, _ = x.shape
        cos, sin = step.rope(self.rotary)
        c = self.kv_norm(self.kv_down(x))
        k_r = self.rotary.apply(self.k_rope(x).view(B, T, 1, self.d_R), cos, sin).view(B, T, self.d_R)
        return torch.cat((c, k_r), dim=-1)

    def queries(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, H, T, d_nope] and RoPE'd q_rope [B, H, T, d_R]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_R)
        cos, sin = step.rope(self.rotary)
        q_rope = self.rotary.apply(q[..., self.d_nope:], cos, sin)
        return q[..., : self.d_nope].transpose(1, 2), q_rope.transpose(1, 2)

    def decompressed(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, H, S, d_nope + d_R] and values (zero-padded to the same size) of latent rows
        [B, 1, S, d_c + d_R]: the ``expand`` of the decompressed path."""
        B, _, S, _ = rows.shape
        H = self.n_heads
        c, k_r = rows[:, 0, :, : self.d_c], rows[:, 0, :, self.d_c:]
        k_nope = self.k_up(c).view(B, S, H, self.d_nope).transpose(1, 2)
        k = torch.cat((k_nope, k_r[:, None].expand(B, H, S, self.d_R)), dim=-1)
        # Values padded with zeros to the query/key head size: the fused (flash) attention kernels need
        # equal head sizes, and without them SDPA materialises every [T, S] score matrix.
        v = F.pad(self.v_up(c).view(B, S, H, self.d_v).transpose(1, 2), (0, self.d_nope + self.d_R - self.d_v))
        return k, v

    def _absorbed_queries(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Each head's query mapped into latent space, [B, H, T, d_c + d_R]. A bias of k_up adds
        ``q_nope_h . b_h`` to every score of a query alike, which the softmax ignores: only the weight
        matters."""
        w_uk = effective_linear(self.k_up, self.d_c, q_nope)[0].view(self.n_heads, self.d_nope, self.d_c)
        return torch.cat((torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk), q_rope), dim=-1)

    def _up_values(self, ctx: torch.Tensor) -> torch.Tensor:
        """Each head's weighted latent [B, H, T, d_c (+ d_R, dropped)] up-projected to its value. The
        attention weights sum to 1, so a bias of v_up is added once, as it is to every value."""
        w_uv, b_uv = effective_linear(self.v_up, self.d_c, ctx)
        o = torch.einsum("bhtc,hvc->bhtv", ctx[..., : self.d_c], w_uv.view(self.n_heads, self.d_v, self.d_c))
        return o if b_uv is None else o + b_uv.view(self.n_heads, 1, self.d_v)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, step: Step, cache=None, shared: dict | None = None) -> torch.Tensor:
        """``cache``: the producer's ``AttentionCache`` of latent rows (None: this call's rows only);
        ``shared``: the caches producers leave for the layers reading their latent."""
        B, T, _ = x.shape
        if self.is_producer:
            kv = CallKV() if cache is None else cache
            kv.append(self.latent(x, step)[:, None])  # one "K/V head" whose rows are keys and values
            if shared is not None:
                shared[self.layer] = kv
        else:
            if cache is not None:
                raise CacheError(f"MLA layer {self.layer} reads layer {self.kv_source}'s latent; pass no cache")
            if shared is None or self.kv_source not in shared:
                raise LookupError(f"MLA layer {self.layer} reads the latent of layer {self.kv_source}, but no "
                                  f"shared latent for layer {self.kv_source} was given (run layer "
                                  f"{self.kv_source} first with the same `shared` dict)")
            kv = shared[self.kv_source]
        reused = cache is not None or not self.is_producer
        q_nope, q_rope = self.queries(x, step)
        absorb = self.absorb if self.absorb is not None else (T == 1 and reused)
        if absorb:
            # Keys AND values are the rows themselves ([c ; k_R], one shared "head", no copy): the rope
            # part of the weighted sum is computed and dropped, which keeps key and value head sizes
            # equal so SDPA can use its fused kernels.
            o = self._up_values(kv.attend(self._absorbed_queries(q_nope, q_rope), step, scale=self.scale))
        else:  # SDPA's default scale is 1/sqrt(d_nope + d_R)
            o = kv.attend(torch.cat((q_nope, q_rope), dim=-1), step, expand=self.decompressed)[..., : self.d_v]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    # ------------------------------------------------------------------ facts from a config
    # A consumer layer (CLA, MLKV) has no latent projections and owns no cache: ``produces_kv``.
    @staticmethod
    def cache_bytes_per_row(config: ModelConfig, context: int, dtype: torch.dtype, *, produces_kv: bool = True) -> int:
        """Bytes its ``LatentCache`` holds per row at ``context`` positions: d_c + d_R per position."""
        return (config.mla_kv_rank + config.mla_rope_dim) * dtype.itemsize * context if produces_kv else 0

    @staticmethod
    def prefill_flops(config: ModelConfig, n: float, *, produces_kv: bool = True) -> float:
        """Useful FLOPs over a prefill of ``n`` positions, the useful work of the decompressed path:
        per position the query, the up-projections of its own latent, the output (and the latent and
        rope key); attention over d_nope + d_R query/key dims and d_nope value dims."""
        d, H, dh = config.dim, config.n_heads, config.head_dim
        r, dr = config.mla_kv_rank, config.mla_rope_dim
        q = d * H * (dh + dr) if config.mla_q_rank is None else config.mla_q_rank * (d + H * (dh + dr))
        projections = q + r * 2 * H * dh + H * dh * d + (d * (r + dr) if produces_kv else 0)
        return 2 * projections * n + 2 * H * (2 * dh + dr) * visible_pairs(n)

    @staticmethod
    def quadratic_prefill(config: ModelConfig) -> bool:
        return True


__all__ = ["LatentCache", "MultiHeadLatentAttention"]
