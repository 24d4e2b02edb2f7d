"""Block Transformer (arXiv 2406.02657): global-to-local language modelling.

    tokens -> block embedder: each block of b tokens -> concat of b embeddings of width dim/b
           -> block decoder (L_b causal blocks over block positions)   <- cache: one K/V per block
           -> context embedding c_k of block k -> norm -> linear dim -> P*dim: P prefix vectors
           -> token decoder (L - L_b causal blocks over a local window: P prefix vectors + the b
              tokens of block k+1, own embedding of width dim, RoPE over local positions 0..P+b-1)
           -> norm -> lm_head

Block 0 has no previous block: its prefix is the same linear map of a learned start context vector.
Token j of block k+1 is predicted by the token decoder's output at local position P-1+j, so the
logits of slot t come from window (t+1)//b at local position P-1+(t+1)%b; the last token of a block
only feeds the block decoder (its token-decoder output predicts nothing and is never computed).

Blocks start at each row's first real token: a row's k-th block is its real tokens k*b .. k*b+b-1,
whatever the row's length and left padding, exactly as in training (where rows start at slot 0). So
the full forward, a chunked prefill, decoding, a left-padded batch and a row alone all cut a sequence
into the same blocks, and every scoring path (a forward with labels, lm-eval log-likelihoods, a
generate without cache) agrees with cached generation.

Padding rule: rows are grouped by phase, ``(-pad) mod b``; a group runs in its own frame, shifted by
that many virtual pad slots in front, so that its rows' pads become multiples of b: such a row has
``pad // b`` blocks made only of pad slots, masked out of the block decoder (``slot_mask`` over block
indices with block pad ``pad // b``; block RoPE positions are ``k - pad // b``), and every window up
to and including block ``pad // b`` gets the start prefix. A batch of one phase (one row, equal
lengths, or lengths that differ by multiples of b) is one group; otherwise each group is a separate
pass of the same layers.

Cache (``ModelCache.layers``): one ``PhasedBlockCache`` holding, per phase group, the block decoder's
``KVCache`` per layer (one entry per completed block), then the token decoder's local ``KVCache`` per
layer (capacity P + b, holding the current block's window: prefix + its tokens so far; emptied when
the block completes), then the current block's token ids (b int64 per row, needed to embed the block
once it completes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import ModelCache, map_rows, tensor_bytes
from ..config import ModelConfig
from ..layers import Linear, RMSNorm, RotaryEmbedding, Step
from ..mixers.attention import CausalSelfAttention
from .base import Block, CausalLM, InputError, ffn_flops, lm_head_flops


class BlockIds:
    """The token ids of the current, incomplete block, [B, b] (int64)."""

    batch_fields = ("ids",)

    def __init__(self, batch_size: int, block_len: int, device=None):
        self.ids = torch.zeros((batch_size, block_len), dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return tensor_bytes(self.ids)


class PhaseGroup:
    """The rows of one phase (``rows``, on the CPU; None: every row of the batch), the ``shift`` of
    virtual pad slots in front of their frame, their caches (block KVs, local KVs, BlockIds), and
    ``pad_blocks``: each row's count of blocks made only of pad slots in that frame (on the CPU; None
    without padding)."""

    def __init__(self, rows: torch.Tensor | None, shift: int, layers: list | None,
                 pad_blocks: torch.Tensor | None = None):
        self.rows, self.shift, self.layers, self.pad_blocks = rows, shift, layers, pad_blocks
        # Whether the block decoder masks pad blocks, read here once, so that a step reads no tensor
        # value (no host synchronisation).
        self.masks_pad_blocks = pad_blocks is not None and bool(pad_blocks.max() > 0)


class PhasedBlockCache:
    """The Block Transformer's caches: one set per phase group (see the module docstring)."""

    def __init__(self, groups: list[PhaseGroup]):
        self.groups = groups

    @property
    def batch_size(self) -> int:
        return sum(g.layers[-1].ids.shape[0] for g in self.groups)

    def parts(self) -> list:
        """Every cache it holds (all groups)."""
        return [c for g in self.groups for c in g.layers]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.parts())

    def with_rows(self, rows) -> "PhasedBlockCache":
        """The caches after ``ModelCache.with_rows``: each new row is its source row's copy, in the
        source row's group."""
        batch = self.batch_size
        source = rows(torch.arange(batch))
        groups = []
        for g in self.groups:
            place = torch.full((batch,), -1, dtype=torch.long)  # each batch row's index within this group
            members = torch.arange(batch) if g.rows is None else g.rows
            place[members] = torch.arange(len(members))
            picked = place[source]
            new_rows = (picked >= 0).nonzero().flatten()
            if len(new_rows):
                index = picked[new_rows]
                layers = [map_rows(c, lambda t: t.index_select(0, index.to(t.device))) for c in g.layers]
                pad_blocks = None if g.pad_blocks is None else g.pad_blocks[index]
                groups.append(PhaseGroup(new_rows, g.shift, layers, pad_blocks))
        if len(groups) == 1:
            groups[0].rows = None  # one group again: every row, in order
        return PhasedBlockCache(groups)


class BlockTransformer(CausalLM):
    # A decode step's path depends on the slot's place in its block (the block decoder runs when a block
    # completes, the local window restarts): torch.compile would specialise and recompile every slot.
    decode_compiles = False
    # Its cache groups rows by their place in a block (``PhasedBlockCache``), not one cache per row.
    decodes_rows_apart = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        b, P, D = config.block_len, config.block_prefix, config.dim
        self.block_len, self.block_prefix = b, P
        self.n_block_layers, self.n_token_layers = self.decoder_depths(config)
        rope = (config.rope_theta, config.rope_freqs, config.rope_pairs)
        # Block decoder: its own token embedding of width dim/b; RoPE over block positions.
        self.block_embed = nn.Embedding(config.vocab_size, D // b)
        self.block_rotary = RotaryEmbedding(config.head_dim, *rope)
        self.block_layers = nn.ModuleList(Block(CausalSelfAttention(config, self.block_rotary), config)
                                          for _ in range(self.n_block_layers))
        self.block_norm = RMSNorm(D, eps=config.norm_eps)
        # Context embedding -> P prefix vectors; the start context stands in for block -1.
        self.expand = Linear(D, P * D, bias=False)
        self.start_context = nn.Parameter(torch.zeros(D))
        # Token decoder: self.embed (width dim) and RoPE over local positions 0..P+b-1.
        self.token_rotary = RotaryEmbedding(config.head_dim, *rope)
        self.token_layers = nn.ModuleList(Block(CausalSelfAttention(config, self.token_rotary), config)
                                          for _ in range(self.n_token_layers))
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        cfg = self.config
        nn.init.normal_(self.block_embed.weight, std=cfg.dim ** -0.5 if cfg.scale_embeddings else cfg.init_std)
        nn.init.normal_(self.start_context, std=1.0)  # the scale of a normed context embedding

    # ------------------------------------------------------------------ caches
    def residual_blocks(self) -> list[Block]:
        raise InputError("the Block Transformer has no hidden state per token and layer: its block decoder runs "
                         "over blocks and its token decoder over windows of prefix vectors and tokens")

    def cache_owners(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.block_layers] + [layer.mixer for layer in self.token_layers]

    def cache_read_bytes(self, context: int, dtype: torch.dtype, quantization=None) -> int:
        # every layer reads its own cache once (a block-decoder layer its block entries, a token-decoder
        # layer its window): the bytes the cache holds (its owners' caches are not the mixers' own size)
        if quantization is not None:
            raise InputError("the Block Transformer's caches are not quantized (kv_bits)")
        return self.cache_bytes_for(self.config, 1, context, dtype)

    def new_cache(self, batch_size: int = 1, *, capacity: int | None = None, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, device=None, compression=None, kv_bits=None) -> ModelCache:
        if compression is not None:
            raise InputError("the Block Transformer's caches (block embeddings, a bounded local cache) are not "
                             "compressed by token-eviction policies")
        if kv_bits is not None:
            raise InputError("the Block Transformer's caches (block embeddings, a bounded local cache) are not "
                             "quantized (kv_bits)")
        dtype, device, pad = self.cache_context(batch_size, capacity, pad, dtype, device)
        b, P = self.block_len, self.block_prefix
        groups = self.phase_groups(pad)
        for group in groups:
            rows_in_group = batch_size if group.rows is None else len(group.rows)
            blocks = None if capacity is None else max(1, -(-(capacity + group.shift) // b))
            layers = [layer.mixer.new_cache(rows_in_group, dtype=dtype, device=device, capacity=blocks)
                      for layer in self.block_layers]
            layers += [layer.mixer.new_cache(rows_in_group, dtype=dtype, device=device, capacity=P + b)
                       for layer in self.token_layers]
            layers.append(BlockIds(rows_in_group, b, device))
            group.layers = layers
        return ModelCache([PhasedBlockCache(groups)], batch_size, pad)

    def phase_groups(self, pad: torch.Tensor | None) -> list[PhaseGroup]:
        """The phase groups of a batch left-padded by ``pad`` (their caches not yet built): the rows (None:
        all) whose pads agree modulo b, the virtual left padding that puts their first real token on a
        block boundary, and the blocks of pad slots each row then starts with."""
        if pad is None:
            return [PhaseGroup(None, 0, None)]
        pad = pad.cpu()
        shift = (-pad) % self.block_len
        phases = shift.unique().tolist()
        members = [None] if len(phases) == 1 else [(shift == phase).nonzero().flatten() for phase in phases]
        return [PhaseGroup(rows, phase, None, torch.div((pad if rows is None else pad[rows]) + phase, self.block_len,
                                                        rounding_mode="floor"))
                for rows, phase in zip(members, phases)]

    # ------------------------------------------------------------------ facts from a config
    @staticmethod
    def decoder_depths(config: ModelConfig) -> tuple[int, int]:
        """(block-decoder layers, token-decoder layers)."""
        n_block = config.block_layers if config.block_layers is not None else config.n_layers // 2
        return n_block, config.n_layers - n_block

    @classmethod
    def cache_bytes_per_row(cls, config: ModelConfig, context: int, dtype: torch.dtype) -> int:
        """One block-decoder K/V entry per (begun) block, the token decoder's local window of P + b
        positions, and the current block's ids."""
        b, P = config.block_len, config.block_prefix
        n_block, n_token = cls.decoder_depths(config)
        blocks = max(1, -(-context // b))
        block_decoder = n_block * CausalSelfAttention.cache_bytes_per_row(config, blocks, dtype)
        token_decoder = n_token * CausalSelfAttention.cache_bytes_per_row(config, P + b, dtype)
        return block_decoder + token_decoder + b * torch.long.itemsize

    @classmethod
    def prefill_flops(cls, config: ModelConfig, n: int) -> float:
        """The block decoder over n / b block embeddings (plus the prefix expansion of each); the token
        decoder runs only for the block holding the last prompt token: a constant, left out."""
        d = config.dim
        blocks = n / config.block_len
        n_block, _ = cls.decoder_depths(config)
        block_layer = CausalSelfAttention.prefill_flops(config, blocks) + ffn_flops(config, blocks)
        expand = 2 * d * config.block_prefix * d * blocks
        return n_block * block_layer + expand + lm_head_flops(config)

    @classmethod
    def quadratic_prefill(cls, config: ModelConfig) -> bool:
        # Its block decoder attends over n / block_len positions: quadratic in them, but block_len^2
        # times cheaper than attention over tokens, so it counts as affordable at every context (bench
        # measures it rather than extrapolating it), as it always has.
        return False

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache: ModelCache | None = None, pad: torch.Tensor | None = None,
                num_logits: int | None = None, check_ids: bool = True) -> torch.Tensor | None:
        step = self.begin(ids, cache, pad, num_logits, check_ids)
        ids = ids.long()
        if cache is None:
            groups = self.phase_groups(step.pad)
        else:
            groups = cache.layers[0].groups
            cache.seen = step.start + ids.shape[1]
        if len(groups) == 1:
            return self._frame(ids, groups[0], step.start, step.pad, num_logits)
        parts = []  # every group runs (each updates its own caches), then the rows are put back in order
        for g in groups:
            rows = g.rows.to(ids.device)
            parts.append((rows, self._frame(ids[rows], g, step.start, step.pad[rows], num_logits)))
        if parts[0][1] is None:
            return None
        out = parts[0][1].new_empty(ids.shape[0], *parts[0][1].shape[1:])
        for rows, logits in parts:
            out[rows] = logits
        return out

    def _frame(self, ids: torch.Tensor, group: PhaseGroup, start: int, pad: torch.Tensor | None,
               num_logits: int | None) -> torch.Tensor | None:
        """One phase group's forward, in its frame: the group's ``shift`` virtual pad slots in front
        (added to the ids on the group's first call), so that every row's pad is a multiple of b."""
        shift = group.shift
        prepended = shift if start == 0 else 0
        if prepended:
            ids = torch.cat([ids.new_zeros(ids.shape[0], prepended), ids], dim=1)
        if shift:
            pad = pad + shift
        block_pad = torch.div(pad, self.block_len, rounding_mode="floor") if group.masks_pad_blocks else None
        step = Step(start + shift - prepended, ids.shape[1], pad, ids.device, cache_free=group.layers is None)
        logits = self._aligned_forward(ids, group.layers, step, block_pad, num_logits)
        if prepended and num_logits is None:
            logits = logits[:, prepended:]  # the virtual pad slots' logits
        return logits

    def _aligned_forward(self, ids: torch.Tensor, caches: list | None, step: Step, block_pad: torch.Tensor | None,
                         num_logits: int | None) -> torch.Tensor | None:
        """The forward of rows whose pads are multiples of b (their blocks start at their first real
        token), over the slots of ``step``, reading and updating ``caches`` (None: no cache);
        ``block_pad``: each row's blocks of pad slots, None when no row has one."""
        cfg, b, P = self.config, self.block_len, self.block_prefix
        B, T = ids.shape
        s, end = step.start, step.start + T
        k0, k_end = s // b, end // b  # first block touched; the block holding slot `end` (incomplete)
        n_block = self.n_block_layers
        block_caches = caches[:n_block] if caches is not None else [None] * n_block
        local_caches = caches[n_block:-1] if caches is not None else None
        held = caches[-1] if caches is not None else None

        # Token ids from the first slot of block k0 (earlier tokens of an incomplete block are held).
        filled = s - k0 * b
        all_ids = torch.cat([held.ids[:, :filled], ids], dim=1) if filled else ids

        # Block decoder over the blocks completed by this call: k0 .. k_end-1.
        context = None
        n_done = k_end - k0
        if n_done > 0:
            x = self.block_embed(all_ids[:, : n_done * b]).reshape(B, n_done, cfg.dim)
            if cfg.scale_embeddings:
                x = x * math.sqrt(cfg.dim)
            bstep = Step(k0, n_done, block_pad, ids.device, step.cache_free)
            for layer, c in zip(self.block_layers, block_caches):
                x = layer(x, bstep, c)
            context = self.block_norm(x)  # context[:, i] is block k0 + i's context embedding

        if caches is not None:
            rest = end - k_end * b  # tokens of the new incomplete block
            if rest:
                held.ids[:, :rest] = all_ids[:, all_ids.shape[1] - rest:]

        # Which windows the token decoder must run: those holding requested logits, and (cached) the
        # window of the block left incomplete, which the cache must hold.
        keep = T if num_logits is None else num_logits
        want_list = list(range(end - keep, end))  # slots whose logits are returned
        windows = sorted({(t + 1) // b for t in want_list})
        first_fresh = k0 if s == 0 else k0 + 1  # windows whose prefix is not yet in the cache
        parts = []  # token-decoder outputs at the requested slots, in slot order

        def take(y: torch.Tensor, k: int, first: int) -> None:
            """Append the rows of window k's output y [B, L, D] (local positions first..) that hold
            requested logits: slot t sits at local position P - 1 + (t + 1) - k*b."""
            ts = [t for t in want_list if (t + 1) // b == k]
            if ts:
                lo = P - 1 + ts[0] + 1 - k * b - first
                parts.append(y[:, lo: lo + len(ts)])

        # 1. The cached window of block k0 continues with this call's tokens of that block.
        if s > 0:
            n0 = max(0, min(end, (k0 + 1) * b - 1) - s)
            if n0 and (k0 in windows or k_end == k0):
                x = self.embed_tokens(ids[:, :n0])
                take(self._token_decode(x, P + filled, local_caches), k0, P + filled)
        # 2. Fresh windows (prefix + up to b-1 tokens), run together without a cache.
        fresh = [k for k in windows if first_fresh <= k and (caches is None or k < k_end)]
        if fresh:
            x = torch.cat([self._prefix(fresh, context, k0, block_pad, B),
                           self.embed_tokens(self._window_ids(all_ids, fresh, k0, b))], dim=2)
            y = self._token_decode(x.flatten(0, 1), 0, None).unflatten(0, (B, len(fresh)))
            ts = torch.tensor([t for t in want_list if (t + 1) // b in set(fresh)], device=ids.device)
            if len(ts):
                w = torch.searchsorted(torch.tensor(fresh, device=ids.device), (ts + 1) // b)
                parts.append(y[:, w, P - 1 + (ts + 1) % b])
        # 3. The window of the block this call leaves incomplete starts now: build it in the cache.
        if caches is not None and k_end >= first_fresh:
            for c in local_caches:
                c.length = 0
            x = self._prefix([k_end], context, k0, block_pad, B)[:, 0]
            if end > k_end * b:
                x = torch.cat([x, self.embed_tokens(all_ids[:, (k_end - k0) * b:])], dim=1)
            take(self._token_decode(x, 0, local_caches), k_end, 0)

        if keep == 0:
            return None
        return self.logits(torch.cat(parts, dim=1), None)

    # ------------------------------------------------------------------ pieces
    def _prefix(self, windows: list[int], context: torch.Tensor | None, k0: int, block_pad: torch.Tensor | None,
                B: int) -> torch.Tensor:
        """Prefix vectors [B, len(windows), P, D]: window k gets the context of block k-1, or the start
        context when block k-1 does not exist or is made only of pad slots (k <= pad // b)."""
        D, P = self.config.dim, self.block_prefix
        start = self.expand(self.start_context).view(1, 1, P, D)
        out = []
        for k in windows:
            if k == 0 or context is None or k - 1 < k0:
                out.append(start.expand(B, 1, P, D))
                continue
            pre = self.expand(context[:, k - 1 - k0]).view(B, 1, P, D)
            if block_pad is not None:
                pre = torch.where((k <= block_pad).view(B, 1, 1, 1), start, pre)
            out.append(pre)
        return torch.cat(out, dim=1)

    @staticmethod
    def _window_ids(all_ids: torch.Tensor, windows: list[int], k0: int, b: int) -> torch.Tensor:
        """The first b-1 token ids of each window's block [B, len(windows), b-1] (all_ids starts at block
        k0); slots past the input are 0 (later positions of a causal window: no requested output
        depends on them)."""
        B, L = all_ids.shape
        n = b - 1
        cols = torch.tensor([[(k - k0) * b + j for j in range(n)] for k in windows], device=all_ids.device)
        valid = cols < L
        picked = all_ids[:, cols.clamp_max(L - 1)]
        return picked.masked_fill(~valid, 0)

    def _token_decode(self, x: torch.Tensor, start: int, caches) -> torch.Tensor:
        """The token decoder over windows x [N, L, D] starting at local position `start`."""
        step = Step(start, x.shape[1], None, x.device, cache_free=caches is None)
        for i, layer in enumerate(self.token_layers):
            x = layer(x, step, caches[i] if caches is not None else None)
        return x
