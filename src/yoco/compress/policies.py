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
- ``InfLLM``: not a ranking but a context memory: initial tokens + a local window + top-k retrieved
  blocks of evicted tokens, the blocks offloaded with a bounded resident set (``infllm.py``).
"""

from __future__ import annotations

import math

import torch

from ..errors import YocoError

# Protected entries rank above every score; among them, the more recent rank higher.
PROTECTED = 1e12


class BudgetError(YocoError, ValueError):
    """A budget or policy setting that cannot work; the message names it."""


class Policy:
    """A compression rule with a budget: ``budget`` < 1 (a float) is a ratio of each row's prompt
    tokens, an int >= 1 is a token count per row (and per K/V head)."""

    name = "policy"
    observe = "tail"  # whose attention is scored: "tail" (last `window` queries), "all", or None
    keeps_budget_while_decoding = False
    window = 32
    needs_rotary = False  # whether its cache re-rotates keys (it then needs the model's RoPE)
    prefill_chunk: int | None = None  # the longest prompt call it is built for (None: any)

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

    @property
    def needs_rotary(self) -> bool:
        return self.reposition_sinks and self.n_sink > 0

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
        self.prefill_chunk = exc_block_size  # blocks form between calls: a chunk per call, as in the paper

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


POLICIES = {cls.name: cls for cls in (StreamingLLM, SnapKV, PyramidKV, H2O, CORM, InfLLM)}


def make_policy(name: str, budget=None, **options) -> Policy:
    """A policy by name (``streamingllm``, ``snapkv``, ``pyramidkv``, ``h2o``, ``corm``, ``infllm``)."""
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
