"""The inference engine: chunked prefill, token-by-token decode, sampling, batching, streaming.

It is separate from the models and talks to them only through the protocol ``EngineModel`` (written
down below: ``model.new_cache``, ``model(ids, cache, num_logits=...)``, ``model.config``'s limits,
``model.parameters()``) and ``EngineCache``. yoco's models (``CausalLM``) and transformers models
(``yoco.hf_runner.TransformersLM``) both implement it:

- prefill: all prompt tokens but the last go through in chunks of ``prefill_chunk`` with
  ``num_logits=0`` (memory bounded by the chunk, and YOCO skips its cross-decoder); the last prompt
  token then takes the ordinary decode step through every layer and yields the first logits (a
  compression policy plans the calls instead: ``policy.prefill_plan``);
- decode: one token per row per step; the engine's own steps feed tokens it sampled (in the
  vocabulary by construction), so only the prompts are checked, once, and a step reads no tensor
  value (no host synchronisation): with ``compile=True`` ``torch.compile`` captures it;
- batches of prompts of different lengths are left-padded; each row keeps its own RoPE positions
  and never attends to its pads, so it gets the tokens it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .models.base import InputError, check_token_ids


@runtime_checkable
class EngineCache(Protocol):
    """What the engine reads of the cache a model's ``new_cache`` returns (``ModelCache`` for yoco's
    models; for a transformers model, ``hf_runner.TransformersCache`` or a compressed cache). The model
    itself keeps its position (how many slots it has seen) and the rows' left padding in it."""

    compression: Any  # the policy it was built with (``new_cache(compression=...)``), None if uncompressed

    def compress(self) -> None:
        """Apply the policy to the prompt now in the cache (called once, after prefill, with a policy)."""

    def nbytes(self) -> int:
        """The bytes it holds."""


@runtime_checkable
class EngineLimits(Protocol):
    """What the engine reads of a model's ``config``."""

    max_seq_len: int  # positions a sequence may have, prompt and new tokens together
    vocab_size: int


@runtime_checkable
class EngineModel(Protocol):
    """A causal LM the engine can run."""

    config: EngineLimits
    # Whether torch.compile captures its decode step once for every slot (``decode_stepper``); False
    # when the step's Python control flow depends on the slot, so that it would recompile every step.
    decode_compiles: bool
    # Whether one call can decode rows that sit at different positions, each in its own one-row cache
    # (``cache.RowBatch``): how a server batches sequences of any lengths and arrival times. False: each
    # such sequence decodes in a call of its own.
    decodes_rows_apart: bool

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Its parameters: the first one's device is where the engine puts the token ids."""

    def new_cache(self, batch_size: int = 1, *, capacity: int | None = None, pad: torch.Tensor | None = None,
                  device=None, compression=None, kv_bits=None) -> EngineCache:
        """An empty cache for ``batch_size`` rows: ``capacity`` slots in all (prompt + new tokens) if
        known, ``pad`` each row's left padding, ``compression`` a ``yoco.compress`` policy or None,
        ``kv_bits`` the growing K/V caches quantized (``yoco.quantize``) or None."""

    def __call__(self, ids: torch.Tensor, cache: EngineCache, num_logits: int | None = None,
                 check_ids: bool = True) -> torch.Tensor | None:
        """The next tokens ids [B, T] after those the cache has seen, updating it; logits [B, k, V] of
        the last ``num_logits`` positions (None: all; 0: None returned). ``check_ids=False``: the ids
        are known to be in the vocabulary, so the model need not read them to check."""


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k / top_p filter before sampling; seed makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def as_prompt_list(prompts) -> list[list[int]]:
    """Accept a list of token lists, a single token list, or a 1-D/2-D integer tensor."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise InputError(f"prompt token ids must be integers, got dtype {prompts.dtype}")
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise InputError(f"prompt tensor must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, Sequence) or not prompts:
        raise InputError("no prompts given: pass token ids (a list of ints, a list of lists, or a tensor)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InputError(f"prompt {i} must be a sequence of integer token ids")
        out.append(list(p))
    return out


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] left-padded with pad_id to the longest prompt, and each row's pad count [B]."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return ids, pad


class PrefillCall(NamedTuple):
    """One model call of a prefill: prompt tokens ``start:end`` and how many final positions get logits."""

    start: int
    end: int
    num_logits: int


def plan_prefill(prompt_length: int, chunk: int, tail: int | None = None) -> list[PrefillCall]:
    """The calls that run a prompt: chunks of at most ``chunk`` tokens, the last with its last token's
    logits (a server then starts a stream one iteration sooner); or, given a ``tail`` (a compression
    policy's scored queries), chunks without logits and then the last ``tail`` tokens (at least 1, at
    most the prompt) in one call with their logits."""
    if tail is None:
        starts = range(0, prompt_length, chunk) or [0]
        return [PrefillCall(start, min(start + chunk, prompt_length), int(start + chunk >= prompt_length > 0))
                for start in starts]
    tail = min(prompt_length, max(1, tail))
    calls = [PrefillCall(start, min(start + chunk, prompt_length - tail), 0)
             for start in range(0, prompt_length - tail, chunk)]
    return calls + [PrefillCall(prompt_length - tail, prompt_length, tail)]


def prefill_calls(model: EngineModel, ids: torch.Tensor, cache: EngineCache, chunk: int) -> Iterator[torch.Tensor | None]:
    """Run the prompt ids [B, T] into the cache one model call at a time: yields None after each call but
    the last, then the last prompt token's logits [B, V]. A server interleaves these calls with the
    decode steps of the sequences already running, so a long prompt does not stall them.

    With a compression policy the policy plans the calls (``policy.prefill_plan``: e.g. the prompt's
    last queries it scores go through in one final call with their logits, so YOCO runs its
    cross-decoder on them; InfLLM caps the chunk); the cache is then compressed."""
    if chunk < 1:
        raise InputError(f"prefill chunk must be >= 1, got {chunk}")
    if ids.numel():
        check_token_ids(ids, model.config.vocab_size)  # once here, not in every call
    T = ids.shape[1]
    policy = cache.compression
    calls = plan_prefill(T, chunk) if policy is None else policy.prefill_plan(T, chunk)
    for i, call in enumerate(calls):
        logits = model(ids[:, call.start:call.end], cache, num_logits=call.num_logits, check_ids=False)
        if i < len(calls) - 1:
            yield None
    if policy is not None:
        cache.compress()
    yield logits[:, -1]


def prefill(model: EngineModel, ids: torch.Tensor, cache: EngineCache, chunk: int) -> torch.Tensor:
    """Run the prompt ids [B, T] into the cache; return the last prompt token's logits [B, V] (the calls
    of ``prefill_calls``, all at once)."""
    for logits in prefill_calls(model, ids, cache, chunk):
        pass
    return logits


def decode_step(model: EngineModel, tokens: torch.Tensor, cache: EngineCache, *, check_ids: bool = True) -> torch.Tensor:
    """Feed one token per row [B]; return the next logits [B, V]. ``check_ids=False``: the tokens are
    known to be in the vocabulary (sampled from the model's logits), so the model does not read them to
    check it; a yoco model's step then makes no host synchronisation."""
    return model(tokens[:, None], cache, num_logits=1, check_ids=check_ids)[:, -1]


def sampled_decode_step(model: EngineModel, tokens: torch.Tensor, cache: EngineCache) -> torch.Tensor:
    """``decode_step`` of tokens the engine sampled from the model's logits: unchecked (see there)."""
    return decode_step(model, tokens, cache, check_ids=False)


def decode_stepper(model: EngineModel, compile: bool = False):
    """The step the engine decodes ``model``'s sampled tokens with: ``sampled_decode_step``, or
    (``compile``) the same step captured by ``torch.compile``, gpt-fast style: only the hot decode step
    is compiled, the prefill runs eagerly. ``dynamic=True`` because the cache grows by a slot every
    step: its lengths are symbolic from the first compilation, rather than specialised and recompiled
    at every step (what remains: a recompilation when a batch of 1 grows, since torch specialises
    dimensions of size 1, and at the step that fills a preallocated cache's last slot, which the
    engine's own generation never reaches)."""
    if not compile:
        return sampled_decode_step
    if not model.decode_compiles:
        raise InputError(f"{type(model).__name__}'s decode step branches in Python on each slot, so torch.compile "
                         "would recompile it at every step: decode it without compile")
    return torch.compile(sampled_decode_step, dynamic=True)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a stop token, when hit, is included)
    finish_reasons: list[str]  # "stop" or "length" per row
    prompt_tokens: int
    cache_bytes: int
    prefill_s: float
    decode_s: float  # the decode steps' time, those in warmup_steps left out
    stats: dict = field(default_factory=dict)
    warmup_steps: int = 0  # decode steps not in decode_s: with compile, the first one (it compiles)

    @property
    def decode_tok_s(self) -> float:
        steps = max(len(t) for t in self.tokens) - 1 - self.warmup_steps
        return steps * len(self.tokens) / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


class Generation:
    """One batched generation; iterate it to stream tokens, then read ``result()``. ``compile``: decode
    with the step captured by ``torch.compile`` (``decode_stepper``); its first step, which compiles,
    is left out of the decode time (``stats["compile_step_s"]``)."""

    def __init__(self, model: EngineModel, prompts, max_new_tokens: int = 32, *, sampling: SamplingParams | None = None,
                 stop_tokens: Sequence[int] = (), prefill_chunk: int = 1024, pad_id: int = 0, compression=None,
                 compile: bool = False, kv_bits=None):
        self.model = model
        self.prompts = as_prompt_list(prompts)
        for i, p in enumerate(self.prompts):
            if not p:
                raise InputError(f"prompt {i} is empty: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = model.config.max_seq_len
        longest = max(len(p) for p in self.prompts)
        if longest > limit:
            raise InputError(f"prompt of {longest} tokens is longer than the model's maximum max_seq_len={limit}")
        if longest + max_new_tokens > limit:
            raise InputError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                             f"max_seq_len={limit}")
        vocab = model.config.vocab_size
        if not 0 <= pad_id < vocab:
            # fed to the decode steps for rows that stopped, which do not check their tokens
            raise InputError(f"pad_id {pad_id} outside the vocabulary 0..{vocab - 1}")
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.stop_tokens = set(int(t) for t in stop_tokens)
        self.prefill_chunk = prefill_chunk
        self.pad_id = pad_id
        self._compression = compression  # for building the cache; the cache holds it from then on
        if compile and compression is not None:
            raise InputError("compile captures the plain caches' decode step; a compressed cache reads tensor values "
                             "at every step (what to evict), so decode it without compile")
        if compile and kv_bits is not None:
            raise InputError("compile captures the plain caches' decode step; a quantized cache folds its rows' "
                             "residuals as they grow, so decode it without compile")
        self.kv_bits = kv_bits
        self.compile = compile
        self.decode = decode_stepper(model, compile)
        self.compile_step_s: float | None = None  # the first compiled decode step (it compiles)
        self.compressed_bytes: int | None = None
        self.tokens: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reasons = ["length"] * len(self.prompts)
        self.prefill_s = self.decode_s = 0.0
        self.cache: EngineCache | None = None

    def __iter__(self) -> Iterator[list[int | None]]:
        """Yields, per step, each row's new token (None for rows that already stopped)."""
        model = self.model
        device = next(model.parameters()).device
        ids, pad = left_pad(self.prompts, self.pad_id)
        ids = ids.to(device)
        generator = None
        if self.sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.sampling.seed)
        B = len(self.prompts)
        done = torch.zeros(B, dtype=torch.bool)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.cache = cache = model.new_cache(B, capacity=ids.shape[1] + self.max_new_tokens, pad=pad, device=device,
                                                 compression=self._compression, kv_bits=self.kv_bits)
            logits = prefill(model, ids, cache, self.prefill_chunk)
            if cache.compression is not None:
                self.compressed_bytes = cache.nbytes()
            self.prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for step in range(self.max_new_tokens):
                next_tokens = sample(logits, self.sampling, generator).cpu()
                out: list[int | None] = []
                for row in range(B):
                    if done[row]:
                        out.append(None)
                        continue
                    token = int(next_tokens[row])
                    self.tokens[row].append(token)
                    out.append(token)
                    if token in self.stop_tokens:
                        done[row] = True
                        self.finish_reasons[row] = "stop"
                yield out
                if bool(done.all()) or step == self.max_new_tokens - 1:
                    break
                feed = next_tokens.masked_fill(done, self.pad_id).to(device)
                if self.compile and self.compile_step_s is None:  # this step compiles: timed apart
                    started = time.perf_counter()
                    logits = self.decode(model, feed, cache)
                    self.compile_step_s = time.perf_counter() - started
                else:
                    logits = self.decode(model, feed, cache)
            self.decode_s = time.perf_counter() - t0 - (self.compile_step_s or 0.0)

    def result(self) -> GenerationResult:
        stats = {} if self.compressed_bytes is None else {"compressed_prompt_bytes": self.compressed_bytes}
        if self.compile_step_s is not None:
            stats["compile_step_s"] = self.compile_step_s
        return GenerationResult(self.tokens, self.finish_reasons, sum(len(p) for p in self.prompts),
                                self.cache.nbytes() if self.cache is not None else 0, self.prefill_s, self.decode_s,
                                stats, warmup_steps=int(self.compile_step_s is not None))


def stream(model: EngineModel, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] = (),
           prefill_chunk: int = 1024, pad_id: int = 0, compression=None, compile: bool = False,
           kv_bits=None) -> Generation:
    """A streaming generation: ``for step in stream(...)`` yields each row's new token per step.
    ``compression``: a ``yoco.compress`` policy applied to the prompt (and, for the policies that keep
    their budget, at every decode step); ``compile``: decode with the step ``torch.compile`` captured
    (same tokens; the first step compiles); ``kv_bits``: 8, 4 or 2 (or a ``yoco.quantize.KVQuantization``)
    stores the growing K/V caches quantized as KIVI does."""
    return Generation(model, prompts, max_new_tokens, sampling=SamplingParams(temperature, top_k, top_p, seed),
                      stop_tokens=stop_tokens, prefill_chunk=prefill_chunk, pad_id=pad_id, compression=compression,
                      compile=compile, kv_bits=kv_bits)


def generate(model: EngineModel, prompts, max_new_tokens: int = 32, **kwargs) -> GenerationResult:
    """Generate for one prompt or a batch; see ``stream`` for the options."""
    generation = stream(model, prompts, max_new_tokens, **kwargs)
    for _ in generation:
        pass
    return generation.result()
