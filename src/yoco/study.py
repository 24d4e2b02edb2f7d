"""``yoco study``: train several architectures at the same parameter count, data and token budget,
evaluate them alike, and compare quality against KV-cache size.

Parameters are matched as the YOCO paper does, through the FFN width: every architecture's
``ffn_dim`` is chosen so that its parameter count is the closest to the Transformer's at the preset.
All runs share one tokenizer and one set of shards (``OUT/data``) and see the same batches.
Passkey accuracy is measured inside the sliding window (the needle at most W tokens before the
question) and beyond it (the needle at least two windows back, in a context of the training length),
W being the window of the windowed architectures. ``swa`` -- the Transformer with that window in
every layer -- is the control that shows what the global cache adds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_model
from .config import get_config
from .data import SPECIAL_TOKENS, TokenShards, load_tokenizer
from .evaluate import mqar_accuracy, passkey_grid, validation_loss
from .models import cache_bytes, cache_growth_per_token, model_class
from .report import write_json, write_markdown
from .tasks import MQAR_PAIRS, MQAR_QUERIES, MQAR_SAMPLES, mqar_batch, passkey_parts
from .tokenizer import TrainedTokenizer
from .train import TrainSettings, prepare_data, train

STUDY_ARCHS = ("transformer", "mha", "yoco-swa", "yoco-gret", "mqa", "mla", "cla2", "mlkv", "block", "swa")


@dataclass
class StudySettings:
    """What a study sets differently from one training run; the rest is ``TrainSettings``' defaults."""
    archs: tuple[str, ...] = STUDY_ARCHS
    preset: str = "small"
    steps: int = 2000
    batch_size: int = TrainSettings.batch_size
    seq_len: int = TrainSettings.seq_len
    lr: float = TrainSettings.lr
    retrieval_mix: float = 0.25
    corpus: list[str] = field(default_factory=list)
    vocab_size: int = TrainSettings.vocab_size
    trials: int = 4
    seed: int = TrainSettings.seed
    window: int | None = None  # of the windowed architectures (yoco-swa, swa); None: the preset's
    retrieval_tasks: tuple[str, ...] = TrainSettings.retrieval_tasks
    short_seq_len: int | None = None  # a sequence-length curriculum (TrainSettings.short_seq_len)
    short_steps: int = TrainSettings.short_steps
    val_batches: int | None = None  # validation batches of batch_size x seq_len for the final loss; None: all


def parameter_count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config.arch)(config).parameters())


def match_ffn(arch: str, preset: str, target: int, **overrides) -> tuple[int, int]:
    """The FFN width (a multiple of 8) whose parameter count is closest to `target`, and that count."""
    lo, hi = 8, 64 * get_config(arch, preset, **overrides).ffn_dim
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        if parameter_count(get_config(arch, preset, ffn_dim=mid, **overrides)) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda f: abs(parameter_count(get_config(arch, preset, ffn_dim=f, **overrides)) - target))
    return best, parameter_count(get_config(arch, preset, ffn_dim=best, **overrides))


def passkey_context(tokenizer, window: int, seq_len: int) -> int:
    """The context of the beyond-window passkey cells: the training length, and at least 4 windows."""
    return max(seq_len, 4 * window + _passkey_overhead(tokenizer))


def _passkey_overhead(tokenizer) -> int:
    needle, question, _ = passkey_parts(tokenizer.encode, "12345")
    return len(needle) + len(question)


def passkey_split(model, tokenizer, haystack, window: int, trials: int, seed: int,
                  context: int) -> tuple[float | None, float | None]:
    """Mean passkey accuracy with the needle inside the window and beyond it (None when the needle
    and question alone do not fit in the window). Beyond: `context` tokens (`passkey_context`), the
    needle at depth 0, 0.25 or 0.5 of the filler, so more than half the filler (>= 2 windows) before
    the question."""
    overhead = _passkey_overhead(tokenizer)
    inside = None
    if overhead + 8 <= window:
        cells = passkey_grid(model, tokenizer, haystack, [window], [0.0, 0.5, 1.0], trials, seed)
        inside = sum(c["accuracy"] for c in cells) / len(cells)
    cells = passkey_grid(model, tokenizer, haystack, [context], [0.0, 0.25, 0.5], trials, seed + 1)
    return inside, sum(c["accuracy"] for c in cells) / len(cells)


def run_study(settings: StudySettings, out: str | os.PathLike, log=print, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The models are sized by the tokenizer the runs train with (not the preset's vocabulary), so the
    # matched and printed parameter counts are those trained.
    prepare_data(TrainSettings(corpus=settings.corpus, vocab_size=settings.vocab_size, seq_len=settings.seq_len),
                 out / "data", log)
    vocab = {"vocab_size": load_tokenizer(out / "data").get_vocab_size()}
    target = parameter_count(get_config("transformer", settings.preset, **vocab))
    window = settings.window or get_config("yoco-swa", settings.preset).window
    runs = []
    for arch in settings.archs:
        windowed = {"window": window} if get_config(arch, settings.preset).window is not None else {}
        ffn, params = match_ffn(arch, settings.preset, target, **vocab, **windowed)
        log(f"{arch}: ffn_dim {ffn} -> {params / 1e6:.2f}M parameters (target {target / 1e6:.2f}M)")
        train_settings = TrainSettings(arch=arch, preset=settings.preset, corpus=settings.corpus,
                                       vocab_size=settings.vocab_size, steps=settings.steps,
                                       batch_size=settings.batch_size, seq_len=settings.seq_len, lr=settings.lr,
                                       warmup=max(1, settings.steps // 20), eval_every=max(1, settings.steps // 4),
                                       save_every=settings.steps, log_every=max(1, settings.steps // 50),
                                       retrieval_mix=settings.retrieval_mix, seed=settings.seed,
                                       retrieval_tasks=settings.retrieval_tasks, short_seq_len=settings.short_seq_len,
                                       short_steps=settings.short_steps,
                                       overrides={"ffn_dim": ffn, **windowed,
                                                  "max_seq_len": max(4096, 8 * window, settings.seq_len)})
        run_dir = out / arch
        # A finished run is not trained again: re-running a study re-evaluates it.
        train(train_settings, run_dir, resume=(run_dir / "latest").exists(), log=log, progress=progress,
              data_dir=out / "data")
        model = load_model(latest_checkpoint(run_dir)).eval()
        tokenizer = TrainedTokenizer(out / "data", model.config.vocab_size)
        val = TokenShards(out / "data", "val")
        # The final loss over the held-out split (the whole of it by default): the few batches of the
        # periodic validation during training differ between architectures by more than they do.
        val_loss = validation_loss(model, val, settings.batch_size, settings.seq_len, settings.val_batches)
        beyond_context = passkey_context(tokenizer, window, settings.seq_len)
        haystack = val.tokens if len(val) > 2 * beyond_context else TokenShards(out / "data", "train").tokens
        inside, beyond = passkey_split(model, tokenizer, haystack, window, settings.trials, settings.seed,
                                       beyond_context)
        ids, mask = mqar_batch(MQAR_SAMPLES, MQAR_PAIRS, MQAR_QUERIES,
                               range(len(SPECIAL_TOKENS), model.config.vocab_size), seed=settings.seed)
        at_4k = cache_bytes(model.config, 1, 4096, torch.float32)
        per_token = cache_growth_per_token(model.config, torch.float32)
        runs.append({"arch": arch, "params": model.num_parameters(), "ffn_dim": ffn,
                     "train_tokens": settings.steps * settings.batch_size * settings.seq_len,
                     "val_loss": val_loss["val_loss"], "val_tokens": val_loss["tokens"],
                     "kv_bytes_per_token": per_token,
                     "cache_bytes_per_token_4k": at_4k / 4096,
                     "passkey_acc_in_window": inside, "passkey_acc_beyond_window": beyond,
                     "mqar_acc": mqar_accuracy(model, ids, mask)})
    results = {"settings": {**settings.__dict__, "archs": list(settings.archs), "window": window,
                            "passkey_beyond_context": beyond_context, "target_params": target}, "runs": runs}
    write_json(results, out / "results.json")
    write_markdown(markdown(results), out / "results.md")
    plot_study(results, out)
    return results


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def curriculum(s: dict) -> str:
    if s["short_seq_len"] is None:
        return ""
    return f"the first {s['short_steps']} steps on {s['short_seq_len']}-token rows, "


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Study: preset {s['preset']}, {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, "
             f"{curriculum(s)}retrieval mix {s['retrieval_mix']} ({', '.join(s['retrieval_tasks'])}), "
             f"window {s['window']}; passkey beyond the window: context "
             f"{s.get('passkey_beyond_context', '?')}, the needle at least two windows back; val loss over "
             f"{results['runs'][0]['val_tokens']:,} held-out tokens",
             "",
             "| arch | params | ffn | val loss | KV bytes/token | cache/token at 4K | passkey in window | "
             "passkey beyond | MQAR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['arch']} | {r['params'] / 1e6:.2f}M | {r['ffn_dim']} | {r['val_loss']:.4f} | "
                     f"{r['kv_bytes_per_token']:,.0f} | {r.get('cache_bytes_per_token_4k', float('nan')):,.0f} | "
                     f"{_pct(r['passkey_acc_in_window'])} | "
                     f"{_pct(r['passkey_acc_beyond_window'])} | {_pct(r['mqar_acc'])} |")
    return "\n".join(lines) + "\n"


def plot_study(results: dict, out: Path) -> None:
    from .report import save_figure

    runs = results["runs"]
    save_figure(pareto_figure(runs), out / "pareto.png")
    curves = {r["arch"]: training_losses(out / r["arch"]) for r in runs}
    save_figure(loss_curves_figure(curves), out / "loss_curves.png")
    save_figure(retrieval_figure(results), out / "retrieval.png")


def pareto_figure(runs: list[dict]):
    """Validation loss against KV-cache size, one point per architecture."""
    from .report import plain_tick_labels, subplots

    fig, ax = subplots(figsize=(6, 4.2))
    for r in runs:
        if r["val_loss"] is None or not math.isfinite(r["val_loss"]):
            continue  # no validation split (a one-document corpus): nothing to place
        # the whole cache at 4K tokens over 4K: windowed caches stop growing, yet are never 0
        ax.scatter(r["cache_bytes_per_token_4k"], r["val_loss"])
        ax.annotate(r["arch"], (r["cache_bytes_per_token_4k"], r["val_loss"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache bytes per token at 4K context (fp32, log)")
    ax.set_ylabel("validation loss")
    ax.set_title("quality against cache size (same parameters, data and tokens)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


def training_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def loss_curves_figure(curves: dict[str, list[tuple[int, float]]]):
    """One training-loss curve per architecture."""
    from matplotlib.ticker import MaxNLocator

    from .report import plain_tick_labels, subplots

    fig, ax = subplots(figsize=(6, 4.2))
    for arch, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=arch)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 1.5
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss (same parameters, data and tokens)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


RETRIEVAL_BARS = (("passkey_acc_in_window", "passkey in window"),
                  ("passkey_acc_beyond_window", "passkey beyond window"),
                  ("mqar_acc", "MQAR"))


def retrieval_figure(results: dict):
    """Retrieval accuracies side by side per architecture. A quantity no run measured (passkey inside a
    window too small for the needle) gets no bars and no legend entry, and a run without a figure no
    bar: a 0 bar would read as a measured failure."""
    from .report import plain_tick_labels, subplots

    runs = results["runs"]
    measured = [(key, label) for key, label in RETRIEVAL_BARS if any(r[key] is not None for r in runs)]
    missing = [label for key, label in RETRIEVAL_BARS if (key, label) not in measured]
    fig, ax = subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(measured))
    for k, (key, label) in enumerate(measured):
        shift = (k - (len(measured) - 1) / 2) * width
        have = [(i, r[key]) for i, r in enumerate(runs) if r[key] is not None]
        ax.bar([i + shift for i, _ in have], [value for _, value in have], width, label=label)
    ax.set_xticks(range(len(runs)), [r["arch"] for r in runs], rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    title = f"retrieval accuracy (window {results['settings']['window']} tokens)"
    if missing:
        title += f"; not measured: {', '.join(missing)}"
    ax.set_title(title, fontsize=9)
    if measured:
        ax.legend(fontsize=8)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


__all__ = ["STUDY_ARCHS", "StudySettings", "loss_curves_figure", "match_ffn", "pareto_figure", "retrieval_figure",
           "run_study"]
