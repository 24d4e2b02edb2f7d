"""``yoco bench-serve``: servers under the same load, one after the other, on this machine.

For each architecture it writes a model folder (random weights of the preset, a BPE tokenizer trained
on half of the standard library's sources), starts its server as a subprocess on 127.0.0.1 with the KV
budget (``yoco serve``; ``hf-serve``: transformers' own server with continuous batching, its paged
KV blocks sized to the same budget), runs the load generator (``load.run_load``) with distinct
prompts cut from the other half of the sources (no prefix shared between requests, no text the
tokenizer was trained on), records the server's peak resident memory, and stops it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import YocoError
from .load import run_load

HF_SERVE = "hf-serve"


class BenchServeError(YocoError, RuntimeError):
    pass


@dataclass
class ServeBenchSettings:
    archs: tuple[str, ...] = ("yoco-swa", "transformer", HF_SERVE)
    context: int = 16384
    kv_budget_gib: float = 1.0
    new_tokens: int = 128
    concurrency: int = 64
    duration: float | None = 600.0
    requests: int | None = None
    preset: str = "40m"
    prefill_chunk: int = 4096
    max_batch: int = 256
    dtype: str = "fp32"
    seed: int = 0
    workdir: str = "runs/bench-serve"
    url: str | None = None  # a running server instead of starting each
    startup_timeout: float = 600.0


# ---------------------------------------------------------------------- text
def split_sources() -> tuple[list[Path], list[Path]]:
    """The standard library's sources in two halves by a hash of their names: the tokenizer's, the prompts'."""
    from ..data import in_validation, stdlib_sources

    halves: tuple[list[Path], list[Path]] = ([], [])
    for f in stdlib_sources():
        halves[in_validation(f.name + str(f.parent.name), 50.0)].append(f)
    return halves


def bench_tokenizer(workdir: Path, vocab_size: int):
    """The benchmark's BPE tokenizer: trained once on part of the first half of the sources, then reused."""
    from tokenizers import Tokenizer

    from ..data import train_tokenizer
    from ..report import atomic_write

    path = Path(workdir) / f"tokenizer-{vocab_size}.json"
    if not path.is_file():
        texts = [f.read_text(errors="replace") for f in split_sources()[0][:400]]
        tokenizer = train_tokenizer(texts, vocab_size)
        atomic_write(path, lambda tmp: tokenizer.save(tmp))
    return Tokenizer.from_file(str(path))


def held_out_prompts(tokenizer, context: int) -> Iterator[str]:
    """Distinct prompts of ``context`` tokens, consecutive pieces of the second half of the sources."""
    buffer: list[int] = []
    for path in split_sources()[1]:
        buffer += tokenizer.encode(path.read_text(errors="replace")).ids
        while len(buffer) >= context:
            yield tokenizer.decode(buffer[:context])
            buffer = buffer[context:]


# ---------------------------------------------------------------------- model folders
def model_folder(arch: str, settings: ServeBenchSettings, tokenizer) -> Path:
    """A folder of ``arch`` (random weights of the preset) with the tokenizer, written once."""
    from ..checkpoint import save_model
    from ..config import get_config
    from ..models import build_model
    from ..tokenizer import save_tokenizer

    positions = settings.context + settings.new_tokens + 256  # re-encoding the prompt text may add a few
    folder = Path(settings.workdir) / "models" / f"{arch}-{settings.preset}-{positions}"
    if (folder / "config.json").is_file():
        return folder
    if arch == HF_SERVE:
        from .peer import write_llama_folder

        write_llama_folder(folder, tokenizer, preset=settings.preset, seed=settings.seed, max_seq_len=positions)
        return folder
    config = get_config(arch, settings.preset)
    if config.max_seq_len < positions:
        config = config.replace(max_seq_len=positions)
    model = build_model(config, seed=settings.seed)
    save_tokenizer(tokenizer, folder, config.max_seq_len)
    save_model(model, folder, tokenizer=tokenizer)
    return folder


# ---------------------------------------------------------------------- servers
def server_command(arch: str, folder: Path, port: int, settings: ServeBenchSettings) -> list[str]:
    if arch == HF_SERVE:
        from .peer import hf_serve_command

        return hf_serve_command(folder, host="127.0.0.1", port=port,
                                kv_budget_bytes=int(settings.kv_budget_gib * (1 << 30)), dtype=settings.dtype)
    return [sys.executable, "-m", "yoco.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
            "--kv-budget-gib", str(settings.kv_budget_gib), "--max-batch", str(settings.max_batch),
            "--max-waiting", str(max(256, settings.concurrency)), "--prefill-chunk", str(settings.prefill_chunk),
            "--dtype", settings.dtype, "--name", arch]


def prepared_prompts(tokenizer, settings: ServeBenchSettings) -> Iterator[str]:
    """The run's prompts, all cut and decoded before the clock starts (so that the load generator's
    tokenizer does not take the server's cores during the run): ``requests`` of them, or for a duration
    three per client (more than any server here completes), as many as the held-out half holds (about
    4M tokens); running out ends the run with an error."""
    from itertools import islice

    count = settings.requests or 3 * settings.concurrency
    prompts = list(islice(held_out_prompts(tokenizer, settings.context), count))
    if len(prompts) < min(count, settings.concurrency + 1):
        raise BenchServeError(f"the held-out sources hold {len(prompts)} prompts of {settings.context} tokens, "
                              f"fewer than the {settings.concurrency} clients need")
    count = len(prompts)

    def supply() -> Iterator[str]:
        yield from prompts
        raise BenchServeError(f"the run used all {count} prepared prompts; give --requests or a shorter --duration")

    return supply()


def bench_one(arch: str, settings: ServeBenchSettings, tokenizer, progress=None) -> dict:
    """One server under the load; its row of the results."""
    prompts = prepared_prompts(tokenizer, settings)
    extra = {} if arch == HF_SERVE else {"ignore_eos": True}
    load = dict(concurrency=settings.concurrency, new_tokens=settings.new_tokens, duration=settings.duration,
                requests=settings.requests, extra_body=extra, progress=progress)
    peak_rss, server = None, dict.fromkeys(SERVER_FIGURES)
    if settings.url is not None:
        summary = asyncio.run(run_load(settings.url, arch, prompts, **load))
    else:
        from .peer import free_port, hf_model_name, start_server

        folder = model_folder(arch, settings, tokenizer)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(settings.workdir) / "logs" / f"{arch}-{settings.context}.log"
        argv = server_command(arch, folder, port, settings)
        name = hf_model_name(folder) if arch == HF_SERVE else arch
        with start_server(argv, f"{url}/v1/models", settings.startup_timeout, log) as process:
            summary = asyncio.run(run_load(f"{url}/v1", name, prompts, **load))
            if arch != HF_SERVE:
                server = server_figures(url)
        peak_rss = process.peak_rss_at_stop
    return {"arch": arch, "context": settings.context, "concurrency": settings.concurrency, **asdict(summary),
            "peak_rss_bytes": peak_rss, **server}


# What a yoco server says of its run (``/metrics``): the most sequences it decoded at once, and where its
# time went, prefill calls against decode steps (seconds and counts).
SERVER_FIGURES = {"server_max_running": "yoco_max_running_sequences",
                  "server_prefill_s": "yoco_prefill_call_seconds_sum",
                  "server_prefill_calls": "yoco_prefill_call_seconds_count",
                  "server_decode_s": "yoco_decode_step_seconds_sum",
                  "server_decode_steps": "yoco_decode_step_seconds_count"}


def server_figures(url: str) -> dict:
    """``SERVER_FIGURES`` read from a yoco server (None for any it does not give)."""
    import httpx

    from .metrics import parse_metrics

    try:
        samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    except httpx.HTTPError:
        samples = {}
    return {key: samples.get(name) for key, name in SERVER_FIGURES.items()}


def markdown_table(rows: list[dict]) -> str:
    def f(v, digits=2):
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    from ..report import format_bytes
    from ..report import markdown_table as table

    headers = ["arch", "context", "clients", "requests", "failed", "output tok/s", "requests/s", "max concurrent",
               "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "ITL p99 s", "peak RSS"]
    return table(headers, [[r["arch"], r["context"], r["concurrency"], r["requests"], r["failed"], f(r["output_tok_s"]),
                            f(r["requests_s"], 3), r["max_concurrent"], f(r["ttft_p50_s"]), f(r["ttft_p99_s"]),
                            f(r["itl_p50_s"], 3), f(r["itl_p99_s"], 3),
                            "-" if r["peak_rss_bytes"] is None else format_bytes(r["peak_rss_bytes"])] for r in rows])


def ratio_lines(rows: list[dict], arch: str = "yoco-swa") -> list[str]:
    """``arch`` against every other server of the same context: concurrency and output tokens/s."""
    out = []
    for base in rows:
        for row in rows:
            if row["arch"] == arch and base["arch"] != arch and base["context"] == row["context"]:
                conc = row["max_concurrent"] / base["max_concurrent"] if base["max_concurrent"] else None
                tok = row["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else None
                out.append(f"- {arch} vs {base['arch']} @ {row['context']}: "
                           f"{'-' if conc is None else f'{conc:.1f}x'} the concurrent sequences, "
                           f"{'-' if tok is None else f'{tok:.1f}x'} the output tokens/s")
    return out


def plot(rows: list[dict], path: str) -> None:
    from ..arguments import token_count_text
    from ..report import plain_tick_labels, save_figure, subplots

    labels = [f"{r['arch']}\n{token_count_text(r['context'])}" for r in rows]
    fig, axes = subplots(1, 4, figsize=(17, 4.2))
    for ax, key, title in ((axes[0], "output_tok_s", "output tokens/s"),
                           (axes[1], "max_concurrent", "most sequences streaming at once"),
                           (axes[2], "ttft_p50_s", "median time to first token (s)")):
        values = [r[key] or 0 for r in rows]
        ax.bar(range(len(rows)), values, color=["#2a7ab9" if r["arch"].startswith("yoco") else "#999999" for r in rows])
        ax.set_xticks(range(len(rows)), labels)
        ax.set_title(title)
        ax.set_ylabel(title)
    ramp = axes[3]  # throughput over the run: the ramp while the first prompts are prefilled, then steady
    for r, label in zip(rows, labels):
        minutes = r.get("output_tokens_by_minute") or []
        ramp.plot(range(1, len(minutes) + 1), [n / 60 for n in minutes], marker="o", label=label.replace("\n", " "))
    ramp.set_title("output tokens/s, minute by minute")
    ramp.set_xlabel("minute of the run")
    ramp.set_ylabel("output tokens/s")
    ramp.legend(fontsize=8)
    plain_tick_labels(fig)
    fig.suptitle(f"yoco bench-serve: {rows[0]['concurrency']} clients, the same KV budget per server")
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["ServeBenchSettings", "bench_one", "markdown_table", "plot", "ratio_lines"]
