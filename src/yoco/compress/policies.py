"""Compression policies: which cached tokens an attention cache keeps, with a budget.

A policy is a small object with a budget (a ratio of each row's prompt, or a token count) and a
``priority`` rule: ``CompressedKV`` (``store.py``) keeps, per row and K/V head, the entries of highest
priority. Protected entries (sinks, the recent window) get priorities above every score, so they
always win; empty and pad entries get -inf, so they never do.

- ``StreamingLLM``: ``n_sink`` first tokens + the most recent ones; keeps the budget while decoding;
  the sinks are re-rotated to sit just before the recent window (``StreamingLLM.after_update``).
- ``SnapKV``: the last ``window`` (``observation_window``) prompt queries' attention, summed over each query
  group, average-pooled along the older keys (``kernel_size``, as SnapKV's code pools); top-k per head plus
  the window itself. At prefill only.
- ``PyramidKV``: SnapKV's selection with a per-layer budget falling linearly with depth.
- ``AdaKV``: SnapKV's scores with the layer's budget shared by its K/V heads (top scores across heads
  jointly, each head guaranteed a share). At prefill only.
- ``H2O``: heavy hitters (attention accumulated over every query so far) + a recent window; keeps
  the budget while decoding.
- ``TOVA``: the latest query's attention alone: keep what the last prompt query attends most, then
  evict what the latest query attended least at every decode step.
- ``CORM``: a rule, not a fixed budget (see the class for the exact rule); ``window`` is its
  ``recent_window``.
- ``InfLLM``: not a ranking but a context memory: initial tokens + a local window + top-k retrieved
  blocks of evicted tokens, the blocks offloaded with a bounded resident set (``infllm.py``).

"Window" has four meanings, with four names: a policy's ``observation_window`` (the last prompt
queries whose attention it scores: SnapKV's ``window``), a ``recent_window`` it always keeps (CORM's
``window``; H2O's is a share of its budget), the ``prompt_tail`` the engine sends in the prompt's last
call with logits (so YOCO's cross-decoder runs on the queries a policy scores), and a layer's
``sliding_window`` (the store's, read from the model).
"""

from __future__ import annotations

import math

import torch

from ..cache import KVGeometry
from ..engine import PrefillCall, plan_prefill
from .errors import BudgetError
from .infllm import InfLLMKV
from .store import CompressedKV

# Protected entries rank above every score; among them, the more recent rank higher.
PROTECTED = 1e12


class Policy:
    """A compression rule with a budget: ``budget`` < 1 (a float) is a ratio of each row's prompt
    tokens, an int >= 1 is a token count per row (and per K/V head).

    A new policy is one subclass: ``priority`` (which entries to keep) and, where it needs them, the
    hooks below, which the store (``CompressedKV``) and the engine call; the defaults do nothing
    special, so a policy overrides only what it changes.

    - ``new_store(geometry, ...)``: the cache kind it acts on (a ``CompressedKV``; InfLLM's memory).
    - ``prefill_plan(prompt_length, chunk)``: the calls the engine makes for the prompt (chunks without
      logits, then the ``prompt_tail`` with logits), after which it calls ``compress()``.
    - ``entry_state()``: per-entry tensors the store keeps (``score``, the observed attention, when the
      policy observes; CORM adds ``last_attended``).
    - ``observes(compressed)``: whose attention the store shows it: ``"tail"`` (the last
      ``observation_window`` queries of the prompt's last call), ``"all"``, or None; by default its
      ``observe`` during the prompt, and after ``compress()`` only if it keeps its budget.
    - ``observed(store, probs, mask, q_slots, new_call)``: each block of observed queries' softmax
      weights [B, h, G, T, S] (per K/V head h, its G query heads) under ``mask`` [B, h, 1, T, S];
      ``new_call``: the first block of the first reader of this call (YOCO's cross-decoder layers all
      read one cache: a policy scoring only the latest query resets there); by default summed into
      ``store.score`` (every layer reading the cache adds to it).
    - ``before_compress(store, newest)``: before the prompt's entries are chosen (CORM's rule evicts).
    - ``limit(prompt_tokens, layer, n_layers)`` -> [B] entries per row, ``check_limit(limit)``, and
      ``head_limits(store, limit)`` -> [B, h] entries per row and K/V head (default: each head the row's
      limit; a per-head allocation may read ``store.score``); ``compress()`` keeps, per row and head, the
      ``head_limit`` entries of highest ``priority``.
    - ``before_write(store, newest)``: before each token written after ``compress()``; by default, a
      policy that keeps its budget evicts its lowest-priority entry wherever a head is at its limit
      (``store.evict_over_limit``); CORM first applies its rule.
    - ``after_update(store)``: after ``compress()`` and after every write (StreamingLLM moves its sinks).
    """

    name = "policy"
    observe = "tail"  # whose attention is scored: "tail" (last `observation_window` queries), "all", or None
    observation_window = 32  # the last prompt queries scored when observe == "tail"
    keeps_budget_while_decoding = False
    needs_rotary = False  # whether its cache re-rotates keys (it then needs the model's RoPE)

    budget_required = True  # False: the policy's rule works without a budget (CORM, InfLLM)

    def __init__(self, budget: float | int | None):
        self.budget = check_budget(budget, required=self.budget_required)

    # ------------------------------------------------------------------ the engine and the store
    @property
    def prompt_tail(self) -> int:
        """Prompt tokens the engine sends in the prompt's last call, with their logits: the scored
        queries, which YOCO's cross-decoder must run on to read its global cache."""
        return self.observation_window if self.observe == "tail" else 1

    def prefill_plan(self, prompt_length: int, chunk: int) -> list[PrefillCall]:
        """The calls the engine makes for a prompt of ``prompt_length`` tokens in chunks of ``chunk``."""
        return plan_prefill(prompt_length, chunk, self.prompt_tail)

    def new_store(self, geometry: KVGeometry, **options) -> CompressedKV:
        """The cache this policy compresses, for a mixer caching ``geometry``; ``options``: ``layer``,
        ``n_layers``, ``batch_size``, ``dtype``, ``device``, ``pad``."""
        return CompressedKV(self, **geometry.store_options(), **options)

    def new_transformers_cache(self, model, batch_size: int, pad: torch.Tensor | None = None):
        """A transformers ``Cache`` of this policy's stores, one per attention layer of ``model`` (a
        Llama/Mistral/Qwen2-like causal LM); transformers is imported only when one is asked for."""
        from .hf import CompressedCache

        return CompressedCache(model, self, batch_size, pad)

    def entry_state(self) -> dict[str, torch.dtype]:
        """Per-entry tensors the store keeps for this policy: name -> dtype (a new entry starts at its
        slot for an integer dtype, at 0 otherwise)."""
        return {"score": torch.float32} if self.observe else {}

    def observes(self, compressed: bool) -> str | None:
        return self.observe if not compressed or self.keeps_budget_while_decoding else None

    def observed(self, store, probs: torch.Tensor, mask: torch.Tensor, q_slots: torch.Tensor, *,
                 new_call: bool) -> None:
        store.score += probs.sum(dim=(2, 3))

    def before_compress(self, store, newest: int) -> None:
        pass

    def head_limits(self, store, limit: torch.Tensor) -> torch.Tensor:
        return limit[:, None].expand(-1, store.k.shape[1])

    def before_write(self, store, newest: int) -> None:
        if self.keeps_budget_while_decoding and self.budget is not None:
            store.evict_over_limit(newest)

    def after_update(self, store) -> None:
        pass

    # ------------------------------------------------------------------ budgets
    def limit(self, prompt_tokens: torch.Tensor, layer: int, n_layers: int) -> torch.Tensor:
        """Entries each row may hold ([B] long) for rows of ``prompt_tokens`` real prompt tokens."""
        if self.budget is None:
            return torch.full_like(prompt_tokens, 2 ** 62)
        if isinstance(self.budget, int):
            return torch.full_like(prompt_tokens, self.budget)
        return (prompt_tokens.double() * self.budget).ceil().long().clamp_min(1)

    def check_limit(self, limit: torch.Tensor) -> None:
        """Refuse a budget this policy cannot honour (e.g. no room beside its sinks)."""

    # ------------------------------------------------------------------ ranking
    def priority(self, slots: torch.Tensor, newest: int, score: torch.Tensor | None, limit: torch.Tensor,
                 pad: torch.Tensor | None) -> torch.Tensor:
        """[B, h, S] float priorities of the entries at ``slots`` (valid entries only matter);
        ``newest`` is the slot of the latest token, ``score`` the accumulated attention (or None),
        ``limit`` each row's entries [B], ``pad`` each row's left padding (or None)."""
        raise NotImplementedError


def check_budget(budget, required: bool = True):
    if budget is None:
        if required:
            raise BudgetError("a budget is required: a ratio in (0, 1] or a token count >= 1")
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget must be a ratio in (0, 1] or a token count, got {budget!r}")
    if isinstance(budget, float) and budget.is_integer() and budget > 1:
        budget = int(budget)
    if isinstance(budget, int):
        if budget < 1:
            raise BudgetError(f"a token budget must be >= 1, got {budget}")
        return budget
    if not 0 < budget <= 1:
        raise BudgetError(f"a budget ratio must be in (0, 1], got {budget} (give an integer for a token count)")
    return float(budget)


def recency(slots: torch.Tensor) -> torch.Tensor:
    return slots.double()


class StreamingLLM(Policy):
    """Attention sinks + a recent window (Xiao et al., 2023): keep the first ``n_sink`` tokens and the
    most recent ``budget - n_sink``; evict the oldest non-sink token at every decode step."""

    name = "streamingllm"
    observe = None
    keeps_budget_while_decoding = True
    reposition_sinks = True

    @property
    def needs_rotary(self) -> bool:
        return self.reposition_sinks and self.n_sink > 0

    def __init__(self, budget, n_sink: int = 4):
        super().__init__(budget)
        if n_sink < 0:
            raise BudgetError(f"n_sink must be >= 0, got {n_sink}")
        self.n_sink = n_sink

    def check_limit(self, limit: torch.Tensor) -> None:
        if int(limit.min()) <= self.n_sink:
            raise BudgetError(f"StreamingLLM budget of {int(limit.min())} tokens leaves no room for a recent "
                              f"window beside its {self.n_sink} sink tokens")

    def priority(self, slots, newest, score, limit, pad):
        first = 0 if pad is None else pad[:, None, None]
        sink = (slots - first) < self.n_sink
        return torch.where(sink, 2 * PROTECTED, 0.0) + recency(slots)

    def after_update(self, store) -> None:
        """The kept tokens get contiguous positions: sinks, then the recent window. With keys cached at
        their true positions the same relative geometry is had by moving only the sinks to sit just
        before the oldest recent token (RoPE scores depend on position differences only), so queries
        keep their true positions. Sinks are re-rotated from an unrotated copy each time (kept in the
        store's ``row_state``), never step by step (no rounding drift in bf16)."""
        n = self.n_sink
        if n == 0 or not self.reposition_sinks:
            return
        first = store.first_slots()
        slots = store.slots[:, 0]  # position-based: every head holds the same tokens
        is_sink = (slots >= 0) & (slots - first[:, None] < n)
        rest = torch.where((slots >= 0) & ~is_sink, slots, torch.iinfo(torch.long).max).min(-1).values
        delta = (rest - first - n).clamp_min(0)
        delta = torch.where(rest == torch.iinfo(torch.long).max, 0, delta)
        # a sliding window frees the sinks once they leave it, and their entries are reused
        held = is_sink[:, :n]
        moving = (delta > 0) & held.any(-1)
        if not bool(moving.any()):
            return
        state = store.row_state
        if "sink_keys" not in state:
            state["sink_keys"] = store.k[:, :, :n].clone()
            state["sink_moved"] = torch.zeros_like(moving)
        fresh = moving & ~state["sink_moved"]
        if bool(fresh.any()):
            state["sink_keys"][fresh] = store.k[fresh, :, :n]
            state["sink_moved"] |= fresh
        moved = store.rotate(state["sink_keys"], delta)
        store.k[:, :, :n] = torch.where((moving[:, None] & held)[:, None, :, None], moved, store.k[:, :, :n])


class SnapKV(Policy):
    """SnapKV (Li et al., 2024): score prompt keys by the attention of the last ``window`` prompt
    queries (summed over each K/V head's query group), smooth with an average pool of ``kernel_size``
    along keys, keep the window plus the top-scoring rest. Compresses the prompt only. ``window`` is
    its ``observation_window``: the queries scored, and the recent tokens always kept."""

    name = "snapkv"
    observe = "tail"

    def __init__(self, budget, window: int = 32, kernel_size: int = 5):
        super().__init__(budget)
        if window < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise BudgetError(f"SnapKV needs window >= 1 and an odd kernel_size, got {window}, {kernel_size}")
        self.observation_window, self.kernel_size = window, kernel_size

    def pooled(self, score: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """``score`` [B, h, S] of the ``scored`` entries (the others: 0) averaged over each entry's
        ``kernel_size`` neighbours, divided by ``kernel_size`` wherever it stands, as SnapKV's code pools
        (``avg_pool1d`` of the prefix's scores, zero-padded, ``count_include_pad``; kvpress alike): the
        observation window, a row's left padding and the prompt's edges are neighbours scoring 0, so a
        padded row pools as it would alone."""
        B, h, S = score.shape
        score = score.float() * scored
        if self.kernel_size == 1:
            return score
        return torch.nn.functional.avg_pool1d(score.reshape(B * h, 1, S), self.kernel_size, stride=1,
                                              padding=self.kernel_size // 2).view(B, h, S)

    def priority(self, slots, newest, score, limit, pad):
        recent = slots > newest - self.observation_window
        real = (slots >= 0) if pad is None else (slots >= pad[:, None, None])
        return torch.where(recent, PROTECTED + recency(slots), self.pooled(score, real & ~recent).double())


class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): SnapKV's selection with per-layer budgets falling linearly with
    depth. With an average budget ``cap`` and window ``w``: ``min = (cap - w) / beta``,
    ``max = 2 (cap - w) - min`` (clamped so no layer keeps more than its prompt), and layer i of L keeps
    ``w + max - i (max - min) / (L - 1)``; with one layer, or ``cap <= w``, it is SnapKV."""

    name = "pyramidkv"

    def __init__(self, budget, window: int = 32, kernel_size: int = 5, beta: float = 20):
        super().__init__(budget, window, kernel_size)
        if beta <= 1:
            raise BudgetError(f"PyramidKV beta must be > 1, got {beta}")
        self.beta = beta

    def limit(self, prompt_tokens, layer, n_layers):
        cap = super().limit(prompt_tokens, layer, n_layers)
        return pyramid_limit(cap, prompt_tokens, self.observation_window, self.beta, layer, n_layers)


def pyramid_limit(cap: torch.Tensor, prompt_tokens: torch.Tensor, window: int, beta: float, layer: int,
                  n_layers: int) -> torch.Tensor:
    """Per-row entries of ``layer`` under PyramidKV's linear schedule around an average of ``cap``."""
    out = cap.clone()
    if n_layers < 2:
        return out
    for b in range(len(cap)):
        c, w = int(cap[b]), window
        if c <= w:
            continue
        low = (c - w) / beta
        high = 2 * (c - w) - low
        room = int(prompt_tokens[b]) - w
        if high > room:
            high = max(room, 0)
            low = 2 * (c - w) - high
        out[b] = w + int(high - layer * (high - low) / (n_layers - 1))
    return out


class AdaKV(SnapKV):
    """Ada-KV (Feng et al., 2024, arXiv 2407.11550) on SnapKV's scores ("Ada-SnapKV"): the layer's
    budget is shared by its K/V heads instead of split evenly. A row of limit n keeps n x h entries in
    all (h K/V heads): the highest SnapKV priorities across every head of the layer jointly, after a
    safeguard gives each head its own top ``floor(alpha_safeguard x n)`` (0.2, as in the paper and
    kvpress). The observation window ranks above every score in each head, so every head keeps it (all
    of it once n >= window). Compresses the prompt only, as SnapKV.

    The tensors stay dense ([B, h, S]): they are sized for the largest head's limit, the other heads'
    spare entries empty (the tokens decoded next fill them first). So ``nbytes()`` counts h x the
    largest head limit per row, while the tokens held (``live()``) per row are exactly n x h."""

    name = "adakv"

    def __init__(self, budget, window: int = 32, kernel_size: int = 5, alpha_safeguard: float = 0.2):
        super().__init__(budget, window, kernel_size)
        if isinstance(alpha_safeguard, bool) or not isinstance(alpha_safeguard, (int, float)) \
                or not 0 <= alpha_safeguard <= 1:
            raise BudgetError(f"AdaKV alpha_safeguard (each head's guaranteed share of the per-head budget) "
                              f"must be in [0, 1], got {alpha_safeguard!r}")
        self.alpha_safeguard = float(alpha_safeguard)

    def head_limits(self, store, limit):
        valid = store.valid()
        priority = store.priority(store.seen - 1).masked_fill(~valid, float("-inf"))
        return self.allocate(priority, limit)

    def allocate(self, priority: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        """Entries per row and K/V head [B, h] for ``priority`` [B, h, S] (-inf: not an entry) and rows
        of ``limit`` [B] entries per head on average."""
        B, h, S = priority.shape
        held = (priority > float("-inf")).sum(-1)  # [B, h] entries a head can give
        total = torch.minimum(limit[:, None], held).sum(-1)  # [B]: n x h, or all a short prompt has
        guaranteed = torch.minimum((limit.double() * self.alpha_safeguard).floor().long()[:, None], held)
        ranked = priority.sort(-1, descending=True).values  # each head's priorities, best first
        rank = torch.arange(S, device=priority.device)
        ranked = torch.where(rank < guaranteed[..., None], float("inf"), ranked)
        # rank-major before the stable sort: among equal priorities the heads take turns, so heads
        # with identical scores get identical limits (SnapKV's even split)
        order = ranked.transpose(1, 2).reshape(B, S * h).sort(dim=-1, descending=True, stable=True).indices
        chosen = torch.arange(S * h, device=priority.device) < total[:, None]
        return torch.zeros_like(held).scatter_add_(1, order % h, chosen.long())


class TOVA(Policy):
    """TOVA (Oren et al., 2024, arXiv 2401.06104, "Transformers are Multi-State RNNs"): a fixed budget
    chosen by the latest query alone. At the prompt, keep the entries the last prompt query attends
    most; while decoding, a head at its budget evicts the entry the latest query attended least (the
    latest token itself a candidate). Per layer and K/V head: the weights of the K/V head's query
    group summed (and, for YOCO's global cache, summed over the cross-decoder layers reading it);
    ``heads="layer"`` sums them over all the layer's heads, so every head keeps the same tokens, as the
    authors' implementation does (it averages over the query heads).

    The one difference from the paper: the budget counts the current token. The paper's cache holds
    ``cache_size`` tokens between steps; a new token's query attends them and itself, then the least
    attended of those ``cache_size + 1`` goes. The store never holds more than its budget, so it makes
    that eviction before writing the next token, with the same query's weights: a budget of n here is
    the paper's ``cache_size`` n - 1 (the same evictions, the same n tokens attended at every step).
    A call of several tokens after compression (the paper decodes one per step) evicts by the last
    scored query's weights among the entries it scored: the call's own tokens stay."""

    name = "tova"
    observe = "tail"
    observation_window = 1  # only the latest query's weights count
    keeps_budget_while_decoding = True

    def __init__(self, budget, heads: str = "kv"):
        super().__init__(budget)
        if heads not in ("kv", "layer"):
            raise BudgetError(f"TOVA heads must be 'kv' (per K/V head) or 'layer' (the same tokens in every head), "
                              f"got {heads!r}")
        self.heads = heads

    def observed(self, store, probs, mask, q_slots, *, new_call: bool) -> None:
        if new_call:  # a new latest query: the previous one's weights no longer count
            store.score.zero_()
        weights = probs[..., -1, :].sum(2)  # [B, h, S]: the latest query, over the K/V head's query group
        if self.heads == "layer":
            weights = weights.sum(1, keepdim=True).expand_as(weights)
        store.score += weights
        store.row_state["scored_query"] = q_slots[-1].repeat(store.k.shape[0])

    def before_write(self, store, newest: int) -> None:
        scored = store.row_state.get("scored_query")
        if scored is not None:  # tokens written after the scored query (same call) have no weight from it
            store.score.masked_fill_(store.slots > scored[:, None, None], float("inf"))
        super().before_write(store, newest)

    def priority(self, slots, newest, score, limit, pad):
        return score.double()


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): each token's attention accumulated over every query
    that saw it (summed over the query heads of its K/V head, and over every layer reading the cache);
    keep the ``recent`` share of the budget as a recent window and fill the rest with the heaviest
    hitters. While decoding, each new token replaces the lightest non-recent one, chosen from the
    scores accumulated before it arrives (so the cache never holds more than the budget)."""

    name = "h2o"
    observe = "all"
    keeps_budget_while_decoding = True
    # the prompt's last 32 queries go through in one call with logits: for YOCO, whose prefill skips
    # the cross-decoder, those are the only prompt queries that score the global cache
    prompt_tail = 32

    def __init__(self, budget, recent: float = 0.5):
        super().__init__(budget)
        if not 0 <= recent <= 1:
            raise BudgetError(f"H2O recent share must be in [0, 1], got {recent}")
        self.recent = recent

    def priority(self, slots, newest, score, limit, pad):
        recent_tokens = (limit.double() * self.recent).ceil()[:, None, None]
        recent = slots > newest - recent_tokens
        return torch.where(recent, PROTECTED + recency(slots), score.double())


class CORM(Policy):
    """CORM (Dai et al., 2024, arXiv 2404.15949): keep a recent window of ``window`` tokens; an older
    token is evicted once none of the ``recent_queries`` most recent queries gave it at least the
    uniform share ``1/t`` of its attention, t being the number of tokens that query saw.

    The rule as implemented: per K/V head, a token counts as attended by a query when ANY query head
    of its group (and, for YOCO's global cache, any cross-decoder layer) gives it >= 1/t; the cache
    remembers the latest query slot that did so; a token older than the window whose latest such
    query lies before the last ``recent_queries`` queries is evicted, at the prompt and at every
    decode step, and never comes back. The kept share therefore depends on the input. An optional
    ``budget`` caps the entries besides the rule (lowest latest-attended slot evicted first)."""

    name = "corm"
    observe = "tail"
    keeps_budget_while_decoding = True
    budget_required = False

    def __init__(self, budget=None, window: int = 32, recent_queries: int | None = None):
        super().__init__(budget)
        recent_queries = window if recent_queries is None else recent_queries
        if window < 1 or recent_queries < 1 or recent_queries > window:
            raise BudgetError(f"CORM needs 1 <= recent_queries <= window, got {recent_queries}, {window}")
        # the prompt queries it scores are those of its recent window
        self.recent_window = self.observation_window = window
        self.recent_queries = recent_queries

    def evicted(self, slots: torch.Tensor, newest: int, last_attended: torch.Tensor) -> torch.Tensor:
        """[B, h, S] True for valid entries the rule evicts now."""
        old = slots <= newest - self.recent_window
        quiet = last_attended <= newest - self.recent_queries
        return (slots >= 0) & old & quiet

    def priority(self, slots, newest, score, limit, pad):
        recent = slots > newest - self.recent_window
        return torch.where(recent, PROTECTED + recency(slots), score.double())

    # ------------------------------------------------------------------ hooks
    def entry_state(self) -> dict[str, torch.dtype]:
        return {**super().entry_state(), "last_attended": torch.long}  # the latest query slot that attended it

    def observed(self, store, probs, mask, q_slots, *, new_call: bool) -> None:
        super().observed(store, probs, mask, q_slots, new_call=new_call)
        # attended = at least the uniform share 1/t of a query that saw t tokens, by any query head of
        # the K/V head's group
        uniform = 1.0 / mask.sum(-1, keepdim=True).clamp_min(1)
        attended = (probs >= uniform).any(2)  # [B, h, T, S]
        latest = torch.where(attended, q_slots[None, None, :, None], -1).amax(2)
        store.last_attended = torch.maximum(store.last_attended, latest)

    def evict_by_rule(self, store, newest: int) -> None:
        store.slots.masked_fill_(self.evicted(store.slots, newest, store.last_attended), -1)

    def before_compress(self, store, newest: int) -> None:
        self.evict_by_rule(store, newest)

    def before_write(self, store, newest: int) -> None:
        self.evict_by_rule(store, newest)
        super().before_write(store, newest)


class InfLLM(Policy):
    """InfLLM (Xiao et al., 2024, arXiv 2402.04617): every query attends the ``n_init`` first tokens, the
    ``n_local`` most recent ones, and ``topk`` blocks of ``block_size`` older tokens retrieved for its
    chunk of ``exc_block_size`` queries (mean chunk query . each block's representative key, averaged
    over query heads). A block's representative is the mean of its ``repr_topk`` keys (4 unless a block
    is smaller) that received the most attention from the queries whose local window held them. Blocks
    leave the accelerator for ``offload_device`` as they form; at most ``max_cached_blocks`` per row
    stay resident (LRU; twice ``topk`` unless given).

    ``positions="shared"`` (the paper): retrieved blocks, and initial or not-yet-blocked tokens outside
    a query's local window, are seen at the one distance ``n_local`` (so the model never meets a
    distance it was not trained on); ``"true"``: every token at its true distance (with top-k covering
    every block this is exactly full attention).

    ``budget`` (a token count, optional) is the attention window ``n_init + n_local + topk *
    block_size``; from it the parts not given are derived in the paper's proportions (128 : 4096 :
    16 x 128 of 6272): ``block_size = clamp(round(128 W / 6272), 8, 128)``, ``n_init = max(4, round(128
    W / 6272))``, ``topk = max(1, round(2048 W / 6272 / block_size))``, ``n_local`` the rest. Without a
    budget the paper's values are used. A ratio cannot be given: the window must be fixed before the
    prompt is read (InfLLM evicts while reading it); ``yoco compress-eval`` converts one with its
    ``--context``."""

    name = "infllm"
    observe = None  # its cache scores its own local attention
    keeps_budget_while_decoding = True
    budget_required = False
    needs_rotary = True
    PAPER = {"n_init": 128, "n_local": 4096, "block_size": 128, "topk": 16, "exc_block_size": 512}

    def __init__(self, budget=None, *, n_init: int | None = None, n_local: int | None = None,
                 block_size: int | None = None, topk: int | None = None, repr_topk: int | None = None,
                 exc_block_size: int | None = None, max_cached_blocks: int | None = None,
                 positions: str = "shared", offload_device: str = "cpu"):
        super().__init__(budget)
        if isinstance(self.budget, float):
            raise BudgetError("InfLLM fixes its window before reading the prompt (it evicts while reading it): "
                              "give its budget as a token count (yoco compress-eval converts a ratio with --context)")
        W, paper = self.budget, self.PAPER
        share = None if W is None else W / (paper["n_init"] + paper["n_local"] + paper["topk"] * paper["block_size"])
        if block_size is None:
            block_size = paper["block_size"] if W is None else min(128, max(8, round(128 * share)))
        if n_init is None:
            n_init = paper["n_init"] if W is None else max(4, round(128 * share))
        if topk is None:
            topk = paper["topk"] if W is None else max(1, round(2048 * share / block_size))
        if n_local is None:
            n_local = paper["n_local"] if W is None else W - n_init - topk * block_size
        elif W is not None and n_init + n_local + topk * block_size != W:
            raise BudgetError(f"InfLLM budget {W} != n_init + n_local + topk * block_size = "
                              f"{n_init} + {n_local} + {topk} * {block_size}")
        if exc_block_size is None:
            exc_block_size = min(paper["exc_block_size"], max(n_local, 1))
        if max_cached_blocks is None:
            max_cached_blocks = 2 * topk
        if repr_topk is None:
            repr_topk = min(4, block_size)
        if n_local < 1:
            raise BudgetError(f"InfLLM budget {W} leaves no local window beside {n_init} initial tokens and "
                              f"{topk} blocks of {block_size}")
        if n_init < 0 or block_size < 1 or topk < 1:
            raise BudgetError(f"InfLLM needs n_init >= 0, block_size >= 1 and topk >= 1, got {n_init}, {block_size}, "
                              f"{topk}")
        if not 1 <= repr_topk <= block_size:
            raise BudgetError(f"InfLLM repr_topk must be in 1..block_size={block_size}, got {repr_topk}")
        if not 1 <= exc_block_size <= n_local:
            raise BudgetError(f"InfLLM exc_block_size must be in 1..n_local={n_local}, got {exc_block_size}")
        if max_cached_blocks < topk:
            raise BudgetError(f"InfLLM max_cached_blocks ({max_cached_blocks}) must hold the topk={topk} blocks "
                              "a chunk retrieves")
        if positions not in ("shared", "true"):
            raise BudgetError(f"InfLLM positions must be 'shared' (the paper) or 'true', got {positions!r}")
        self.n_init, self.n_local, self.block_size, self.topk = n_init, n_local, block_size, topk
        self.repr_topk, self.exc_block_size, self.max_cached_blocks = repr_topk, exc_block_size, max_cached_blocks
        self.positions, self.offload_device = positions, offload_device

    def prefill_plan(self, prompt_length: int, chunk: int) -> list[PrefillCall]:
        # blocks form between calls: a chunk of exc_block_size per call, as in the paper
        return plan_prefill(prompt_length, min(chunk, self.exc_block_size), self.prompt_tail)

    def new_store(self, geometry: KVGeometry, **options) -> InfLLMKV:
        return InfLLMKV(self, **geometry.store_options(), **options)

    @property
    def attention_window(self) -> int:
        """Tokens a query attends at most: initial + local + retrieved."""
        return self.n_init + self.n_local + self.topk * self.block_size

    def __repr__(self) -> str:
        return (f"InfLLM(n_init={self.n_init}, n_local={self.n_local}, block_size={self.block_size}, "
                f"topk={self.topk}, repr_topk={self.repr_topk}, exc_block_size={self.exc_block_size}, "
                f"max_cached_blocks={self.max_cached_blocks}, positions={self.positions!r})")


def policy_for_context(spec: str, budget, context: int) -> Policy:
    """A policy from a spec ``name[:option=value[:...]]`` (e.g. ``infllm:positions=true:topk=4``), with a
    ratio budget of InfLLM (whose window is fixed before the prompt) turned into tokens of a
    ``context``-token prompt."""
    name, *settings = spec.split(":")
    options = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise BudgetError(f"policy option {setting!r} in {spec!r} is not of the form option=value")
        options[key.replace("-", "_")] = option_value(value)
    if name.lower() == "infllm" and isinstance(budget, float) and budget <= 1:
        budget = max(1, math.ceil(budget * context))
    try:
        return make_policy(name, budget, **options)
    except TypeError as e:  # an option the policy does not take
        raise BudgetError(f"{spec!r}: {e}") from None


def option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


POLICIES = {cls.name: cls for cls in (StreamingLLM, SnapKV, PyramidKV, AdaKV, H2O, TOVA, CORM, InfLLM)}

# what ``yoco.compress`` exports: every policy class by its own name, so a new policy is added here only
__all__ = ["POLICIES", "BudgetError", "Policy", "make_policy", "parse_budget", "policy_for_context",
           *(cls.__name__ for cls in POLICIES.values())]


def make_policy(name: str, budget=None, **options) -> Policy:
    """A policy by name (``streamingllm``, ``snapkv``, ``pyramidkv``, ``adakv``, ``h2o``, ``tova``, ``corm``,
    ``infllm``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in POLICIES:
        raise BudgetError(f"unknown compression policy {name!r}; choose from {', '.join(sorted(POLICIES))}")
    return POLICIES[key](budget, **options)


def parse_budget(text: str) -> float | int | None:
    """A budget as written on the command line: a ratio in (0, 1] ("0.25"), a token count >= 1
    ("128"), or "none" (CORM's rule alone; InfLLM's paper sizes). "1" is one token, "1.0" the whole
    prompt (a ratio); "2.0" is two tokens, as "2" is."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"not a budget: {text!r} (a ratio in (0, 1], a token count, or none)") from None
    return check_budget(int(value) if value.is_integer() and value >= 1 and "." not in text else value)
