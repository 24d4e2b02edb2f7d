"""The server's figures, in Prometheus' text exposition format (``GET /metrics``).

The scheduler's thread writes them and the server's thread reads them: each is a plain int or float,
so a reader sees every figure whole (at worst one iteration old)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: a token every few milliseconds (a small batch) up to the first token of a long prompt
# behind a queue (minutes on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


@dataclass
class ServerMetrics:
    running: int = 0  # sequences decoding
    prefilling: int = 0  # sequences admitted whose prompt is still being prefilled
    waiting: int = 0  # requests queued for cache memory
    max_running: int = 0
    cache_bytes: int = 0  # bytes the live caches hold
    max_cache_bytes: int = 0
    reserved_bytes: int = 0  # what the admitted sequences may grow to
    kv_budget_bytes: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason, and "cancelled"
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    # Where an iteration's time goes: each prefill call (a chunk of one prompt) and each decode step (one
    # token of every running sequence), so an operator sees what bounds the inter-token latency.
    prefill_call: Histogram = field(default_factory=Histogram)
    decode_step: Histogram = field(default_factory=Histogram)

    def render(self) -> str:
        def metric(name: str, kind: str, help_: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]

        out: list[str] = []
        for name, value, help_ in (
                ("yoco_running_sequences", self.running, "Sequences decoding."),
                ("yoco_prefilling_sequences", self.prefilling, "Admitted sequences whose prompt is being prefilled."),
                ("yoco_waiting_requests", self.waiting, "Requests waiting for cache memory."),
                ("yoco_max_running_sequences", self.max_running, "Most sequences decoding at once so far."),
                ("yoco_cache_bytes", self.cache_bytes, "Bytes the live sequences' caches hold."),
                ("yoco_max_cache_bytes", self.max_cache_bytes, "Most bytes the live caches held at once so far."),
                ("yoco_cache_reserved_bytes", self.reserved_bytes,
                 "Cache bytes the admitted sequences may grow to (prompt + max_tokens)."),
                ("yoco_cache_budget_bytes", self.kv_budget_bytes, "The KV cache budget (--kv-budget-gib).")):
            out += metric(name, "gauge", help_, [f"{name} {value}"])
        out += metric("yoco_prompt_tokens_total", "counter", "Prompt tokens of the requests accepted.",
                      [f"yoco_prompt_tokens_total {self.prompt_tokens}"])
        out += metric("yoco_generation_tokens_total", "counter", "Tokens generated.",
                      [f"yoco_generation_tokens_total {self.generation_tokens}"])
        out += metric("yoco_requests_finished_total", "counter", "Sequences ended, by finish reason.",
                      [f'yoco_requests_finished_total{{reason="{reason}"}} {n}'
                       for reason, n in sorted(self.finished.items())])
        out += metric("yoco_time_to_first_token_seconds", "histogram", "Arrival to first token.",
                      self.ttft.lines("yoco_time_to_first_token_seconds"))
        out += metric("yoco_inter_token_latency_seconds", "histogram", "Time between a sequence's tokens.",
                      self.itl.lines("yoco_inter_token_latency_seconds"))
        out += metric("yoco_prefill_call_seconds", "histogram", "One prefill call (a chunk of one prompt).",
                      self.prefill_call.lines("yoco_prefill_call_seconds"))
        out += metric("yoco_decode_step_seconds", "histogram", "One decode step of every running sequence.",
                      self.decode_step.lines("yoco_decode_step_seconds"))
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page, name (with labels) -> value (for tests and the benchmark)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
