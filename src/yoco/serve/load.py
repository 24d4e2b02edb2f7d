"""The load generator of ``yoco bench-serve``: C concurrent clients streaming completions from one
OpenAI-compatible server, for a fixed wall time or a fixed number of requests.

Each client sends a prompt, reads the stream to its end, and sends the next prompt. Every streamed
chunk that carries a token (``carries_a_token``) counts as one: yoco serve sends one chunk per token,
transformers serve one per token that completes text (the peer's folder gives every greedy token
whole text, ``peer.write_llama_folder``); its arrival time gives the time to first token and the inter-token latencies. With a fixed
duration only the tokens that arrive inside it count and the requests still streaming at its end are
cancelled (not counted as failed), so a slow server does not make the run endless. ``max_concurrent``
is the most streams that were between their first and their last token at one moment, seen from the
clients, the same measure for every server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTrace:
    sent: float
    token_times: list[float] = field(default_factory=list)
    done: float | None = None
    error: str | None = None


@dataclass
class LoadSummary:
    requests: int  # completed
    failed: int
    output_tokens: int
    elapsed_s: float
    output_tok_s: float
    requests_s: float
    max_concurrent: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    errors: list[str]
    # tokens that arrived in each minute of the run (the last minute may be partial): how throughput
    # ramps up while the first prompts are prefilled, and where it settles
    output_tokens_by_minute: list[int] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(traces: list[RequestTrace], start: float, end: float) -> LoadSummary:
    """The figures of the traces, counting tokens that arrived in [start, end]."""
    completed = [t for t in traces if t.done is not None and t.error is None]
    failed = [t for t in traces if t.error is not None]
    tokens = sum(1 for t in traces for s in t.token_times if start <= s <= end)
    elapsed = end - start
    ttft = [t.token_times[0] - t.sent for t in traces if t.token_times and t.error is None]
    itl = [b - a for t in traces if t.error is None for a, b in zip(t.token_times, t.token_times[1:])]
    # Streams between their first and last token: +1 at the first, -1 after the last.
    edges = sorted([(t.token_times[0], 1) for t in traces if t.token_times]
                   + [(t.token_times[-1], -1) for t in traces if t.token_times], key=lambda e: (e[0], -e[1]))
    live = most = 0
    for _, delta in edges:
        live += delta
        most = max(most, live)
    return LoadSummary(len(completed), len(failed), tokens, elapsed, tokens / elapsed if elapsed > 0 else 0.0,
                       len(completed) / elapsed if elapsed > 0 else 0.0, most,
                       percentile(ttft, 50), percentile(ttft, 99), percentile(itl, 50), percentile(itl, 99),
                       sorted({t.error for t in failed})[:5], tokens_by_minute(traces, start, end))


def tokens_by_minute(traces: list[RequestTrace], start: float, end: float) -> list[int]:
    """The tokens that arrived in each minute of [start, end] (a token exactly at a minute's end counts in
    that minute)."""
    minutes = [0] * max(1, math.ceil((end - start) / 60))
    for t in traces:
        for s in t.token_times:
            if start <= s <= end:
                minutes[min(len(minutes) - 1, max(0, math.ceil((s - start) / 60) - 1))] += 1
    return minutes


def carries_a_token(choice) -> bool:
    """Whether a streamed choice is a token: it has text, or (yoco serve) the token's id while its text
    is held back; transformers serve ends with a chunk of no text that only carries the usage."""
    text = choice.delta.content if hasattr(choice, "delta") else choice.text
    return bool(text) or bool(getattr(choice, "token_ids", None))


async def _one_request(client, model: str, prompt: str, new_tokens: int, extra_body: dict, chat: bool,
                       trace: RequestTrace) -> None:
    options = dict(model=model, max_tokens=new_tokens, temperature=0.0, stream=True, extra_body=extra_body)
    try:
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **options)
        else:
            stream = await client.completions.create(prompt=prompt, **options)
        async for chunk in stream:
            if chunk.choices and carries_a_token(chunk.choices[0]):
                trace.token_times.append(time.perf_counter())
        trace.done = time.perf_counter()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # counted as failed; the run goes on
        trace.error = f"{type(e).__name__}: {e}"[:300]
        trace.done = time.perf_counter()


async def run_load(url: str, model: str, prompts: Iterator[str], *, concurrency: int, new_tokens: int,
                   duration: float | None = None, requests: int | None = None, extra_body: dict | None = None,
                   chat: bool = False, timeout: float = 3600.0,
                   progress: Callable[[int, float], None] | None = None) -> LoadSummary:
    """Run the load against ``url`` (the server's /v1 base); exactly one of ``duration`` (seconds) and
    ``requests`` (a count) bounds it. ``progress(completed, elapsed_s)`` is called as requests end."""
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4),
                                                              timeout=timeout))
    traces: list[RequestTrace] = []
    start = time.perf_counter()
    deadline = None if duration is None else start + duration
    issued = ended = 0

    async def client_loop() -> None:
        nonlocal issued, ended
        while (deadline is None or time.perf_counter() < deadline) and (requests is None or issued < requests):
            issued += 1
            trace = RequestTrace(time.perf_counter())
            traces.append(trace)
            await _one_request(client, model, next(prompts), new_tokens, extra_body or {}, chat, trace)
            ended += 1
            if progress is not None:
                progress(ended, time.perf_counter() - start)

    tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
    try:
        if deadline is None:
            await asyncio.wait(tasks, timeout=timeout)
        else:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    finally:
        for task in tasks:
            task.cancel()  # a stream still open at the deadline: closed, so the server frees it
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    failures = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    if failures:
        raise failures[0]  # the load generator's own failure (e.g. no prompt left), not a request's
    end = time.perf_counter() if deadline is None else min(deadline, time.perf_counter())
    if deadline is None:
        end = max((t.done for t in traces if t.done is not None), default=end)
    return summarise(traces, start, end)  # the streams cut at the deadline count their tokens, not as requests
