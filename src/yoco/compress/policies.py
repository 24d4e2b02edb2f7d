"""Compression policies: which cached tokens an attention cache keeps, with a budget.

A policy is a small object with a budget (a ratio of each row's prompt, or a token count) and a
``priority`` rule: ``CompressedKV`` (``store.py``) keeps, per row and K/V head, the entries of highest
priority. Protected entries (sinks, the recent window) get priorities above every score, so they
always win; empty and pad entries get -inf, so they never do.

- ``StreamingLLM``: ``n_sink`` first tokens + the most recent ones; keeps the budget while decoding;
  the sinks are re-rotated to sit just before the recent window (see ``store.py``).
- ``SnapKV``: the last ``window`` prompt queries' attention, summed over each query group, average-
  pooled along keys (``kernel_size``); top-k per head plus the window itself. At prefill only.
- ``PyramidKV``: SnapKV's selection with a per-layer budget falling linearly with depth.
- ``H2O``: heavy hitters (attention accumulated over every query so far) + a recent window; keeps
  the budget while decoding.
- ``CORM``: a rule, not a fixed budget (see the class for the exact rule).
"""

from __future__ import annotations

import torch

# Protected entries rank above every score; among them, the more recent rank higher.
PROTECTED = 1e12


class BudgetError(ValueError):
    """A budget or policy setting that cannot work; the message names it."""


class Policy:
    """A compression rule with a budget: ``budget`` < 1 (a float) is a ratio of each row's prompt
    tokens, an int >= 1 is a token count per row (and per K/V head)."""

    name = "policy"
    observe = "tail"  # whose attention is scored: "tail" (last `window` queries), "all", or None
    keeps_budget_while_decoding = False
    window = 32

    def __init__(self, budget: float | int | None):
        self.budget = check_budget(budget, required=self.budget_required)

    budget_required = True

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

    def __init__(self, budget, n_sink: int = 4):
        super().__init__(budget)
        if n_sink < 0:
            raise BudgetError(f"n_sink must be >= 0, got {n_sink}")
        self.n_sink = n_sink
        self.window = 0

    def check_limit(self, limit: torch.Tensor) -> None:
        if int(limit.min()) <= self.n_sink:
            raise BudgetError(f"StreamingLLM budget of {int(limit.min())} tokens leaves no room for a recent "
                              f"window beside its {self.n_sink} sink tokens")

    def priority(self, slots, newest, score, limit, pad):
        first = 0 if pad is None else pad[:, None, None]
        sink = (slots - first) < self.n_sink
        return torch.where(sink, 2 * PROTECTED, 0.0) + recency(slots)


class SnapKV(Policy):
    """SnapKV (Li et al., 2024): score prompt keys by the attention of the last ``window`` prompt
    queries (summed over each K/V head's query group), smooth with an average pool of ``kernel_size``
    along keys, keep the window plus the top-scoring rest. Compresses the prompt only."""

    name = "snapkv"
    observe = "tail"

    def __init__(self, budget, window: int = 32, kernel_size: int = 5):
        super().__init__(budget)
        if window < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise BudgetError(f"SnapKV needs window >= 1 and an odd kernel_size, got {window}, {kernel_size}")
        self.window, self.kernel_size = window, kernel_size

    def pooled(self, score: torch.Tensor) -> torch.Tensor:
        B, h, S = score.shape
        if self.kernel_size == 1:
            return score
        pooled = torch.nn.functional.avg_pool1d(score.reshape(B * h, 1, S).float(), self.kernel_size, stride=1,
                                                padding=self.kernel_size // 2, count_include_pad=False)
        return pooled.view(B, h, S)

    def priority(self, slots, newest, score, limit, pad):
        recent = slots > newest - self.window
        return torch.where(recent, PROTECTED + recency(slots), self.pooled(score).double())


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
        return pyramid_limit(cap, prompt_tokens, self.window, self.beta, layer, n_layers)


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


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): each token's attention accumulated over every query
    that saw it (summed over the query heads of its K/V head, and over every layer reading the cache);
    keep the ``recent`` share of the budget as a recent window and fill the rest with the heaviest
    hitters. While decoding, each new token replaces the lightest non-recent one, chosen from the
    scores accumulated before it arrives (so the cache never holds more than the budget)."""

    name = "h2o"
    observe = "all"
    keeps_budget_while_decoding = True

    def __init__(self, budget, recent: float = 0.5):
        super().__init__(budget)
        if not 0 <= recent <= 1:
            raise BudgetError(f"H2O recent share must be in [0, 1], got {recent}")
        self.recent = recent
        # the prompt's last `window` queries go through in one call with logits: for YOCO, whose prefill
        # skips the cross-decoder, those are the only prompt queries that score the global cache
        self.window = 32

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
        self.window, self.recent_queries = window, recent_queries

    def evicted(self, slots: torch.Tensor, newest: int, last_attended: torch.Tensor) -> torch.Tensor:
        """[B, h, S] True for valid entries the rule evicts now."""
        old = slots <= newest - self.window
        quiet = last_attended <= newest - self.recent_queries
        return (slots >= 0) & old & quiet

    def priority(self, slots, newest, score, limit, pad):
        recent = slots > newest - self.window
        return torch.where(recent, PROTECTED + recency(slots), score.double())


POLICIES = {cls.name: cls for cls in (StreamingLLM, SnapKV, PyramidKV, H2O, CORM)}


def make_policy(name: str, budget=None, **options) -> Policy:
    """A policy by name (``streamingllm``, ``snapkv``, ``pyramidkv``, ``h2o``, ``corm``, ``infllm``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in POLICIES:
        raise BudgetError(f"unknown compression policy {name!r}; choose from {', '.join(sorted(POLICIES))}")
    return POLICIES[key](budget, **options)
