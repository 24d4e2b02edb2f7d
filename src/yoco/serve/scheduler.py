"""Continuous batching: one scheduler owns the model and runs every sequence the server admits.

Each iteration (``Scheduler.step``):

1. sequences whose client went away leave, and their caches are freed;
2. waiting requests are admitted in arrival order while the memory budget holds what they can grow to
   (prompt + ``max_tokens`` positions, from the architecture's own cache formula) and fewer than
   ``max_batch`` sequences are active; each gets a one-row cache of exactly that capacity;
3. the oldest sequence in prefill advances by one call of at most ``prefill_chunk`` tokens
   (``engine.prefill_calls``), so a long new prompt costs the running streams one chunk per token,
   not its whole prefill; its last call gives its first token;
4. every running sequence decodes one token in one call (``cache.RowBatch``: each row its own cache
   and positions, whatever its length and arrival), and a sequence that finishes leaves at once.

The scheduler runs on the thread that calls ``run`` (``yoco serve``: the process's main thread, the
HTTP server in another), or in a thread of its own (``start``/``stop``); the server talks to it
through ``submit`` and ``cancel`` and hears back through each request's ``emit`` callback (called from
the scheduler's thread: the callback must hand the event over thread-safely).

Why the main thread: PyTorch's CPU threads are an OpenMP team per calling thread. Once the main thread
has one (loading the model makes it), libgomp wakes a second thread's team from sleep at every parallel
region instead of keeping it spinning (it throttles spinning when teams outnumber the cores), which on
2 cores made every small op ~5x slower and a 16K-token prefill 20-30% slower than on the main thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import RowBatch
from ..engine import SamplingParams, prefill_calls, sample
from ..errors import YocoError
from ..models.base import InputError, check_token_ids
from ..report import format_bytes
from .metrics import ServerMetrics

# The defaults of ``yoco serve``'s --max-batch, --prefill-chunk and --max-waiting.
DEFAULT_MAX_BATCH = 256
DEFAULT_PREFILL_CHUNK = 2048
DEFAULT_MAX_WAITING = 256


class RequestError(YocoError, ValueError):
    """A request the server cannot run as asked (HTTP 400): the message names the problem."""


class Overloaded(YocoError, RuntimeError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


@dataclass
class Event:
    """What a sequence tells its client: new text (and the token) or its end."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length", or "error" when it ends
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_tokens: frozenset[int] = frozenset()  # the tokenizer's end of text, unless the client ignores it
    emit: Callable[[Event], None] = lambda event: None


class TextStream:
    """A sequence's text as its tokens come: the new text each token adds, held back while it could be
    an incomplete UTF-8 character or the start of a stop string, and cut before the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out so far

    def push(self, token: int) -> tuple[str, bool]:
        """The text this token adds that is safe to send, and whether a stop string was reached."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        first = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0),
                    default=-1)
        if first >= 0:
            delta, self.sent = text[self.sent:first], first
            return delta, True
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # the last token ends inside a character
            safe = min(safe, len(text) - 1)
        delta = text[self.sent:max(self.sent, safe)]
        self.sent += len(delta)
        return delta, False

    def rest(self) -> str:
        """The text held back, when the sequence ends without a stop string."""
        text = self.tokenizer.decode(self.tokens)
        delta, self.sent = text[self.sent:], len(text)
        return delta


class Sequence:
    """One request inside the scheduler: its cache, its tokens, where it is."""

    def __init__(self, request: Request, ids: torch.Tensor, reserved: int, tokenizer):
        self.request = request
        self.ids = ids  # the prompt [1, T], checked, on the CPU until admitted
        self.reserved = reserved  # bytes of cache it may grow to, held for it from admission to the end
        self.text = TextStream(tokenizer, request.stop)
        self.tokens: list[int] = []
        self.cache = None
        self.prefill = None  # the prefill's remaining calls (``prefill_calls``) until it has run
        self.cancelled = False
        self.generator = None
        if request.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(request.sampling.seed)
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None


class Scheduler:
    """Runs every admitted sequence of ``model`` (a yoco ``CausalLM``) in continuous batches.

    ``kv_budget``: bytes the live caches may hold at most; ``max_batch``: sequences active at once;
    ``max_waiting``: requests that may wait for room (beyond it ``submit`` raises ``Overloaded``);
    ``compression``: a ``yoco.compress`` policy every sequence's cache uses (None: full caches);
    ``kv_bits``: every sequence's growing K/V caches quantized (``yoco.quantize``; the budget counts
    their quantized bytes)."""

    def __init__(self, model, tokenizer, *, kv_budget: int, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_waiting: int = DEFAULT_MAX_WAITING, compression=None,
                 kv_bits=None, metrics: ServerMetrics | None = None):
        for name, value in (("kv budget", kv_budget), ("max batch", max_batch), ("prefill chunk", prefill_chunk),
                            ("max waiting", max_waiting)):
            if value < 1:
                raise RequestError(f"{name} must be positive, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.kv_budget, self.max_batch, self.prefill_chunk = kv_budget, max_batch, prefill_chunk
        self.max_waiting, self.compression = max_waiting, compression
        self.kv_bits = kv_bits
        if kv_bits is not None:
            model.new_cache(1, capacity=2, kv_bits=kv_bits)  # refuses a model or setting it cannot quantize now
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.metrics = metrics or ServerMetrics()
        self.metrics.kv_budget_bytes = kv_budget
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.reserved = 0
        self._lock = threading.Lock()  # guards ``waiting`` and the cancel flags between threads
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ the server's side
    def reservation(self, positions: int) -> int:
        """Cache bytes of one sequence of ``positions`` slots (what its one-row cache allocates; with a
        compression policy what it holds before the prompt is compressed, in full precision even when
        the kept entries are then quantized)."""
        return self.model.cache_bytes_formula(1, positions, self.dtype,
                                              kv_bits=self.kv_bits if self.compression is None else None)

    def submit(self, request: Request) -> Sequence:
        """Queue a request; raises ``RequestError`` for one that could never run, ``Overloaded`` when
        the waiting queue is full."""
        limit = self.model.config.max_seq_len
        n = len(request.prompt)
        if n == 0:
            raise RequestError("the prompt is empty: it needs at least one token")
        if n > limit:
            raise RequestError(f"prompt of {n} tokens is longer than the model's max_seq_len={limit}")
        if n + request.max_tokens > limit:
            raise RequestError(f"prompt of {n} tokens plus max_tokens={request.max_tokens} exceeds the model's "
                               f"max_seq_len={limit}")
        ids = torch.tensor([request.prompt], dtype=torch.long)
        try:
            check_token_ids(ids, self.model.config.vocab_size)
        except InputError as e:
            raise RequestError(f"prompt {e}") from None
        need = self.reservation(n + request.max_tokens)
        if need > self.kv_budget:
            raise RequestError(f"this request needs {format_bytes(need)} of KV cache (prompt {n} + max_tokens "
                               f"{request.max_tokens} positions), more than the server's whole budget of "
                               f"{format_bytes(self.kv_budget)}")
        sequence = Sequence(request, ids, need, self.tokenizer)
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} requests are already waiting for cache memory; retry later")
            self.waiting.append(sequence)
        self.metrics.prompt_tokens += n
        self._wake.set()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """The client went away: the sequence leaves at the next iteration, its cache freed."""
        with self._lock:
            sequence.cancelled = True
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run iterations on this thread until ``stop`` is called or ``until()`` is true (checked at
        least every 0.1 s while idle)."""
        with torch.inference_mode():
            while not self._stopping and not until():
                if not self.step():
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()

    def start(self) -> None:
        """Run in a thread of its own (tests, or a server whose main thread is taken)."""
        self._thread = threading.Thread(target=self.run, name="yoco-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        busy = bool(self.prefilling or self.running)
        if self.prefilling:
            self._advance_prefill(self.prefilling[0])
        if self.running:
            self._decode(list(self.running))
        self._update_gauges()
        return busy

    def live_bytes(self) -> int:
        """Bytes the active sequences' caches hold now."""
        return sum(s.cache.nbytes() for s in self.prefilling + self.running if s.cache is not None)

    # ------------------------------------------------------------------ the parts of an iteration
    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in [s for s in self.prefilling + self.running if s.cancelled]:
            self._leave(s, None)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self.waiting:
                    return
                head = self.waiting[0]
                active = len(self.prefilling) + len(self.running)
                if active >= self.max_batch or self.reserved + head.reserved > self.kv_budget:
                    return
                self.waiting.popleft()
            self.reserved += head.reserved
            capacity = len(head.request.prompt) + head.request.max_tokens
            head.cache = self.model.new_cache(1, capacity=capacity, device=self.device, compression=self.compression,
                                              kv_bits=self.kv_bits)
            head.prefill = prefill_calls(self.model, head.ids.to(self.device), head.cache, self.prefill_chunk)
            self.prefilling.append(head)

    def _advance_prefill(self, sequence: Sequence) -> None:
        began = time.perf_counter()
        try:
            logits = next(sequence.prefill)
        except Exception as e:  # this sequence fails alone; the others go on
            self._leave(sequence, Event(finish_reason="error", error=f"prefill failed: {e}"))
            return
        self.metrics.prefill_call.observe(time.perf_counter() - began)
        if logits is None:
            return
        self.prefilling.remove(sequence)
        sequence.prefill = None
        self.running.append(sequence)
        self._take(sequence, logits[0])

    def _decode(self, sequences: list[Sequence]) -> None:
        began = time.perf_counter()
        self._decode_groups(sequences)
        self.metrics.decode_step.observe(time.perf_counter() - began)

    def _decode_groups(self, sequences: list[Sequence]) -> None:
        groups = [sequences] if self.model.decodes_rows_apart else [[s] for s in sequences]
        for group in groups:
            feed = torch.tensor([[s.tokens[-1]] for s in group], dtype=torch.long, device=self.device)
            cache = RowBatch([s.cache for s in group], self.device) if len(group) > 1 else group[0].cache
            try:
                logits = self.model(feed, cache, num_logits=1, check_ids=False)[:, -1]
            except Exception as e:
                for s in group:
                    self._leave(s, Event(finish_reason="error", error=f"decode failed: {e}"))
                continue
            for row, s in enumerate(group):
                self._take(s, logits[row])

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits [V], hand it out, and end it if done."""
        token = int(sample(logits[None], sequence.request.sampling, sequence.generator)[0])
        now = time.perf_counter()
        if sequence.last_token_at is None:
            self.metrics.ttft.observe(now - sequence.arrived)
        else:
            self.metrics.itl.observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        sequence.tokens.append(token)
        self.metrics.generation_tokens += 1
        request = sequence.request
        if token in request.stop_tokens:
            self._leave(sequence, Event(sequence.text.rest(), token, "stop"))
            return
        text, stopped = sequence.text.push(token)
        if stopped:
            self._leave(sequence, Event(text, token, "stop"))
        elif len(sequence.tokens) >= request.max_tokens:
            self._leave(sequence, Event(text + sequence.text.rest(), token, "length"))
        else:
            request.emit(Event(text, token))

    def _leave(self, sequence: Sequence, last: Event | None) -> None:
        """The sequence is done (or its client gone): its cache is freed and its room given back."""
        for active in (self.prefilling, self.running):
            if sequence in active:
                active.remove(sequence)
        self.reserved -= sequence.reserved
        sequence.cache = sequence.prefill = None
        if last is not None:
            self.metrics.finished[last.finish_reason] = self.metrics.finished.get(last.finish_reason, 0) + 1
            sequence.request.emit(last)
        else:
            self.metrics.finished["cancelled"] = self.metrics.finished.get("cancelled", 0) + 1

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running, m.prefilling, m.waiting = len(self.running), len(self.prefilling), len(self.waiting)
        m.cache_bytes, m.reserved_bytes = self.live_bytes(), self.reserved
        m.max_running = max(m.max_running, m.running)
        m.max_cache_bytes = max(m.max_cache_bytes, m.cache_bytes)
