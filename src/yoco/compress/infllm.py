"""``InfLLMKV``: InfLLM's context memory (arXiv 2402.04617) as an attention cache.

Per row, in row-relative positions r (slot minus the row's left padding, so a padded row behaves as
if alone), a token is in one of three places:

- the *working set* (``k``/``v``/``slots``, on the compute device): the ``n_init`` first tokens, the
  last ``n_local`` and the few not yet packed into a block; every query attends all of it (causally);
- a *memory unit*: tokens ``n_init + j * block_size ...`` form unit j once the whole block is out of
  the local window of the latest token (``u - last >= n_local``). Units are moved to
  ``offload_device`` (``units_k``/``units_v``), each with a representative key (``repr``, on the
  compute device): the mean of the ``repr_topk`` keys that received the most attention while in the
  working set (the plain mean when no query saw the block, e.g. YOCO's prompt, whose cross-decoder
  the prefill skips);
- a *resident* unit: a copy of a unit in the bounded resident buffer (``max_cached_blocks`` units per
  row, least recently used evicted), loaded when retrieved.

Each chunk of ``exc_block_size`` queries retrieves the ``topk`` units whose representative key best
matches its mean query (averaged over query heads), and attends the working set plus those units.
With ``positions="shared"`` the units, and working tokens outside a query's local window, are seen at
one distance ``n_local`` (queries re-rotated to ``n_local``, keys to 0; RoPE scores depend on the
difference only), as in the paper; with ``"true"``, at their true distances. Units form between calls
(at ``append``), so a long call attends its own tokens fully; the engine sends the prompt in calls of
``exc_block_size`` (its ``prefill_plan``), as the paper does.

Bytes: ``nbytes()`` = working set + resident buffer (what sits on the compute device);
``offloaded_bytes()`` = the units on ``offload_device``.
"""

from __future__ import annotations

import torch

from ..cache import Expand, tensor_bytes
from ..kernels import slot_mask
from ..layers import Step
from .errors import BudgetError
from .store import CompressedKV


class InfLLMKV(CompressedKV):
    """One attention cache as InfLLM's context memory (see the module docstring)."""

    kind = "InfLLM context memory"

    def __init__(self, policy, *, layer: int, n_layers: int, batch_size: int, n_kv_heads: int,
                 key_dim: int, value_dim: int, dtype: torch.dtype, device=None, pad: torch.Tensor | None = None,
                 rotate=None, values_are_keys: bool = False, sliding_window: int | None = None):
        if sliding_window is not None:
            # its memory units hold tokens far out of any window: a sliding-window layer could never
            # attend them, and its own local window would replace the model's
            raise BudgetError("InfLLM brings its own local window; it cannot run on a sliding-window layer "
                              f"(window {sliding_window})")
        super().__init__(policy, layer=layer, n_layers=n_layers, batch_size=batch_size, n_kv_heads=n_kv_heads,
                         key_dim=key_dim, value_dim=value_dim, dtype=dtype, device=device, pad=pad, rotate=rotate,
                         values_are_keys=values_are_keys)
        B, h, bs = batch_size, n_kv_heads, policy.block_size
        offload = torch.device(policy.offload_device)
        self.score = torch.zeros(B, h, 0, device=device)  # attention each working token received locally
        self.units_k = torch.zeros(B, h, 0, bs, key_dim, dtype=dtype, device=offload)
        self.units_v = None if values_are_keys else torch.zeros(B, h, 0, bs, value_dim, dtype=dtype, device=offload)
        self.repr = torch.zeros(B, h, 0, key_dim, device=device)  # fp32, keys at position 0
        self.n_units = torch.zeros(B, dtype=torch.long, device=device)
        self.resident_k = torch.zeros(B, h, 0, bs, key_dim, dtype=dtype, device=device)
        self.resident_v = None if values_are_keys else torch.zeros(B, h, 0, bs, value_dim, dtype=dtype, device=device)
        self.resident_id = torch.zeros(B, 0, dtype=torch.long, device=device)  # unit in each place, -1 none
        self.resident_used = torch.zeros(B, 0, dtype=torch.long, device=device)  # LRU clock of its last use
        self.clock = 0
        self.loads = 0  # units copied into the resident buffer so far

    @property
    def batch_fields(self) -> tuple[str, ...]:
        names = ("k", "v", "slots", "score", "pad", "units_k", "units_v", "repr", "n_units", "resident_k",
                 "resident_v", "resident_id", "resident_used")
        return tuple(n for n in names if getattr(self, n) is not None)

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        """Bytes on the compute device: the working set and the resident units."""
        resident = tensor_bytes(self.resident_k) + (tensor_bytes(self.resident_v) if self.resident_v is not None else 0)
        return super().nbytes() + resident

    def offloaded_bytes(self) -> int:
        """Bytes of the memory units on ``offload_device``."""
        return tensor_bytes(self.units_k) + (tensor_bytes(self.units_v) if self.units_v is not None else 0)

    def index_bytes(self) -> int:
        return tensor_bytes(self.slots, self.score, self.repr, self.n_units, self.resident_id, self.resident_used)

    def first(self) -> torch.Tensor:
        """[B] each row's first real slot."""
        return self.first_slots()

    # ------------------------------------------------------------------ writing
    def append(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Pack the blocks that left the local window into units, then write the next T slots."""
        self._form_units()
        B, h, T = k.shape[:3]
        new_slots = torch.arange(self.seen, self.seen + T, device=k.device).expand(B, h, T)
        self.k = torch.cat((self.k, k), dim=2)
        if self.v is not None:
            self.v = torch.cat((self.v, v), dim=2)
        self.slots = torch.cat((self.slots, new_slots), dim=2)
        self.score = torch.cat((self.score, self.score.new_zeros(B, h, T)), dim=2)
        self.seen += T

    def compress(self) -> None:
        """After the prompt: InfLLM evicted while reading it; the blocks that the prompt's last call
        pushed out of the local window are packed now (the next append would do the same first)."""
        if self.compressed:
            raise BudgetError("this cache is already compressed (compress once, after the prompt)")
        self._form_units()
        self.compressed = True

    def _form_units(self) -> None:
        p, bs = self.policy, self.policy.block_size
        first = self.first()
        latest = self.seen - 1 - first  # row-relative position of the latest token
        target = torch.div(latest + 1 - p.n_local - p.n_init, bs, rounding_mode="floor").clamp_min(0)
        moved = bool((target > self.n_units).any())
        for j in range(int(self.n_units.min()), int(target.max())):
            rows = (self.n_units <= j) & (j < target)
            if bool(rows.any()):
                self._form_unit(j, rows, first)
        pads_held = self.pad is not None and bool((self.slots[:, 0] >= 0).logical_and(
            self.slots[:, 0] < self.pad[:, None]).any())
        if moved or pads_held:
            self._compact(first)

    def _form_unit(self, j: int, rows: torch.Tensor, first: torch.Tensor) -> None:
        """Move block j of the ``rows`` [B] out of the working set into unit j."""
        p, bs = self.policy, self.policy.block_size
        B, h, _, dk = self.k.shape
        positions = p.n_init + j * bs + torch.arange(bs, device=self.k.device)  # row-relative
        wanted = first[:, None] + positions  # [B, bs] slots
        index = (self.slots[:, 0, None, :] == wanted[..., None]).to(torch.int8).argmax(-1)  # [B, bs]
        keys = self.k.gather(2, index[:, None, :, None].expand(B, h, bs, dk))
        score = self.score.gather(2, index[:, None].expand(B, h, bs))
        at_zero = self.rotate(keys, -positions.expand(B, bs))  # keys as if at position 0
        stored = at_zero if p.positions == "shared" else keys
        if self.units_k.shape[2] <= j:
            self.units_k = self._one_more_unit(self.units_k)
            self.units_v = None if self.units_v is None else self._one_more_unit(self.units_v)
            self.repr = torch.cat((self.repr, self.repr.new_zeros(B, h, 1, dk)), dim=2)
        offload = rows.to(self.units_k.device)
        self.units_k[offload, :, j] = stored[rows].to(self.units_k.device)
        if self.units_v is not None:
            values = self.v.gather(2, index[:, None, :, None].expand(B, h, bs, self.v.shape[-1]))
            self.units_v[offload, :, j] = values[rows].to(self.units_v.device)
        self.repr[rows, :, j] = representative(at_zero, score, p.repr_topk)[rows]
        self.n_units[rows] = j + 1

    def _one_more_unit(self, units: torch.Tensor) -> torch.Tensor:
        """``units`` with room for one more; in pinned host memory when the compute device is a GPU, so
        loads into the resident buffer can run asynchronously (``non_blocking``)."""
        B, h, N, bs, d = units.shape
        pinned = units.device.type == "cpu" and self.k.device.type == "cuda"
        grown = torch.zeros(B, h, N + 1, bs, d, dtype=units.dtype, device=units.device, pin_memory=pinned)
        grown[:, :, :N] = units
        return grown

    def _compact(self, first: torch.Tensor) -> None:
        """Drop what left the working set (packed blocks, left padding): the kept entries move to the
        front in slot order and the tensors shrink to the longest row."""
        p = self.policy
        slots = self.slots[:, 0]
        r = slots - first[:, None]
        packed = (r >= p.n_init) & (r < p.n_init + self.n_units[:, None] * p.block_size)
        keep = (slots >= 0) & (r >= 0) & ~packed
        n = int(keep.sum(-1).max())
        order = torch.where(keep, slots, torch.iinfo(torch.long).max).argsort(-1)[:, :n]
        kept = keep.gather(1, order)
        B, h = self.k.shape[:2]
        index = order[:, None].expand(B, h, n)
        self.k = self.k.gather(2, index[..., None].expand(B, h, n, self.k.shape[-1]))
        if self.v is not None:
            self.v = self.v.gather(2, index[..., None].expand(B, h, n, self.v.shape[-1]))
        self.score = self.score.gather(2, index)
        self.slots = torch.where(kept[:, None], self.slots.gather(2, index), -1)

    # ------------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, step: Step, *, scale: float | None = None,
               expand: Expand | None = None) -> torch.Tensor:
        """Queries q [B, H, T, d] at the step's slots; [B, H, T, d_v], a chunk of ``exc_block_size``
        queries at a time (each chunk retrieves its own units). With ``expand``, every entry attended
        (working set, units, representative keys) is expanded first; ``rotate`` then turns the
        queries and the expanded keys alike (MLA's rotates the last d_R dimensions of either)."""
        chunk = self.policy.exc_block_size
        slots = step.slots
        return torch.cat([self._attend_chunk(q[:, :, lo:lo + chunk], slots[lo:lo + chunk], scale, expand)
                          for lo in range(0, q.shape[2], chunk)], dim=2)

    def _attend_chunk(self, q: torch.Tensor, q_slots: torch.Tensor, scale: float | None,
                      expand: Expand | None) -> torch.Tensor:
        p = self.policy
        B, H, T, d = q.shape
        h = self.k.shape[1]
        scale = d ** -0.5 if scale is None else scale
        first = self.first()
        q_pos = q_slots[None] - first[:, None]  # [B, T] row-relative
        real_q = q_pos >= 0
        far_q = self.rotate(q, p.n_local - q_pos)  # each query moved to position n_local
        units = self._retrieve(far_q, real_q, expand)
        unit_k, unit_v, unit_slots = self._load(units, first)
        work_k, work_v = self.keys_values(expand)
        if expand is not None:
            unit_k, unit_v = expand(unit_k)
        n = work_k.shape[1]  # heads attended: the store's h, or every query head once expanded
        group = (B, n, H // n, T, d)

        def scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bhgtd,bhsd->bhgts", queries.float().reshape(group), keys.float()) * scale

        logits = scores(q, work_k)
        rel = q_slots[None, None, :, None] - self.slots[:, :, None, :]  # [B, h, T, S]
        near = rel < p.n_local
        work_mask = slot_mask(q_slots, self.slots, self.pad, none_if_unmasked=False)
        if p.positions == "shared":
            work_pos = (self.slots[:, 0] - first[:, None]).clamp_min(0)
            at_zero = self.rotate(self.k, -work_pos)
            far = scores(far_q, at_zero if expand is None else expand(at_zero)[0])
            logits = torch.where(near[:, :, None], logits, far)
            unit_q = far_q
        else:
            unit_q = q
        unit_logits = scores(unit_q, unit_k)
        unit_mask = (unit_slots >= 0)[:, :, None, :] & real_q[:, None, :, None]  # units are all in the past
        mask = torch.cat((work_mask, unit_mask), dim=-1)[:, :, None]
        probs = torch.cat((logits, unit_logits), dim=-1).masked_fill(~mask, float("-inf")).softmax(-1)
        S = self.k.shape[2]
        unit_v = unit_k if unit_v is None else unit_v
        o = (torch.einsum("bhgts,bhsd->bhgtd", probs[..., :S], work_v.float())
             + torch.einsum("bhgts,bhsd->bhgtd", probs[..., S:], unit_v.float()))
        # what a representative key is chosen by: attention received from queries whose window held it
        local = probs[..., :S] * (near & real_q[:, None, :, None])[:, :, None]
        self.score += local.reshape(B, h, H // h, T, S).sum(dim=(2, 3))
        return o.reshape(B, H, T, -1).to(q.dtype)

    def _retrieve(self, far_q: torch.Tensor, real_q: torch.Tensor, expand: Expand | None) -> torch.Tensor:
        """[B, k] the units each row's chunk retrieves (-1: none): its mean query (at distance n_local
        from keys at 0) against every unit's representative key, averaged over query heads."""
        p = self.policy
        B, H, T, d = far_q.shape
        N = self.repr.shape[2]
        if N == 0:
            return torch.zeros(B, 0, dtype=torch.long, device=far_q.device)
        keys = self.repr if expand is None else expand(self.repr.to(self.k.dtype))[0].float()
        h = keys.shape[1]
        weight = real_q.float()[:, None, :, None]
        mean = (far_q.float() * weight).sum(2) / weight.sum(2).clamp_min(1)  # [B, H, d]
        score = torch.einsum("bhgd,bhnd->bn", mean.view(B, h, H // h, d), keys) / H
        score = score.masked_fill(torch.arange(N, device=score.device) >= self.n_units[:, None], float("-inf"))
        top, index = score.topk(min(p.topk, N), dim=-1)
        return torch.where(top == float("-inf"), -1, index)

    def _load(self, units: torch.Tensor, first: torch.Tensor):
        """Make the retrieved ``units`` [B, k] resident (loading the missing ones over the least recently
        used others) and return their keys, values [B, h, k * block_size, d] and slots."""
        p, bs = self.policy, self.policy.block_size
        B, K = units.shape
        h = self.k.shape[1]
        places = min(p.max_cached_blocks, self.units_k.shape[2])
        if self.resident_k.shape[2] < places:
            self._widen_resident(places)
        self.clock += 1
        resident, used = self.resident_id.tolist(), self.resident_used.tolist()
        where = [[0] * K for _ in range(B)]
        loads = ([], [], [])  # (row, unit, place) of every unit copied in now
        for b, row_units in enumerate(units.tolist()):
            wanted = [u for u in row_units if u >= 0]
            missing = [u for u in wanted if u not in resident[b]]
            free = sorted((i for i, u in enumerate(resident[b]) if u not in wanted),
                          key=lambda i: (resident[b][i] >= 0, used[b][i]))
            for unit, place in zip(missing, free, strict=False):
                resident[b][place] = unit
                for column, value in zip(loads, (b, unit, place), strict=True):
                    column.append(value)
            for i, unit in enumerate(wanted):
                place = resident[b].index(unit)
                used[b][place] = self.clock
                where[b][i] = place
        device = self.k.device
        if loads[0]:  # one batched copy from the offloaded units into the resident buffer
            rows, unit_index, place_index = (torch.tensor(c, device=self.units_k.device) for c in loads)
            targets = (rows.to(device), place_index.to(device))
            self.resident_k[targets[0], :, targets[1]] = self.units_k[rows, :, unit_index].to(device, non_blocking=True)
            if self.resident_v is not None:
                self.resident_v[targets[0], :, targets[1]] = self.units_v[rows, :, unit_index].to(device,
                                                                                                  non_blocking=True)
            self.loads += len(loads[0])
        self.resident_id = torch.tensor(resident, dtype=torch.long, device=device).view(B, -1)
        self.resident_used = torch.tensor(used, dtype=torch.long, device=device).view(B, -1)
        index = torch.tensor(where, dtype=torch.long, device=device).view(B, K)[:, None, :, None, None]

        def gathered(buffer: torch.Tensor) -> torch.Tensor:
            picked = buffer.gather(2, index.expand(B, h, K, bs, buffer.shape[-1]))
            return picked.reshape(B, h, K * bs, buffer.shape[-1])

        slots = first[:, None, None] + p.n_init + units[..., None] * bs + torch.arange(bs, device=device)
        slots = torch.where(units[..., None] >= 0, slots, -1).reshape(B, 1, K * bs).expand(B, h, K * bs)
        values = None if self.resident_v is None else gathered(self.resident_v)
        return gathered(self.resident_k), values, slots

    def _widen_resident(self, places: int) -> None:
        B, h, C, bs, dk = self.resident_k.shape
        extra = places - C
        self.resident_k = torch.cat((self.resident_k, self.resident_k.new_zeros(B, h, extra, bs, dk)), dim=2)
        if self.resident_v is not None:
            dv = self.resident_v.shape[-1]
            self.resident_v = torch.cat((self.resident_v, self.resident_v.new_zeros(B, h, extra, bs, dv)), dim=2)
        self.resident_id = torch.cat((self.resident_id, self.resident_id.new_full((B, extra), -1)), dim=1)
        self.resident_used = torch.cat((self.resident_used, self.resident_used.new_zeros(B, extra)), dim=1)


def representative(keys: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """[B, h, d] fp32: the mean of the ``n`` keys of each block [B, h, bs, d] that received the most
    attention ``score`` [B, h, bs]; the plain mean for a block no query has seen."""
    keys = keys.float()
    top = score.topk(n, dim=-1).indices
    chosen = keys.gather(2, top[..., None].expand(*top.shape, keys.shape[-1])).mean(2)
    unseen = (score.sum(-1) <= 0)[..., None]
    return torch.where(unseen, keys.mean(2), chosen)
