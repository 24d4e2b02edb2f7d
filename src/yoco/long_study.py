"""``yoco study --long``: how far beyond its training length a short-trained model retrieves, per way
its global attention sees positions.

Every run trains as the retrieval study does (the ``small`` preset, window 64, 1024-token rows after a
256-token curriculum, half of every batch passkey rows), so a run differs from another only by its
position option; then it is scored on passkeys from 1K to 1M tokens at five depths, and by its
validation loss at the training length (an option must not cost loss). The options:

- ``rope``: YOCO-SWA as it is (RoPE on the global keys and the cross-decoder's queries);
- ``nope``, ``nope-log``, ``nope-llama4``: no rotation in the global attention (the self-decoder keeps
  its RoPE: SWAN-GPT's and Llama 4's shape), alone or with a query temperature, ``log``
  (max(1, log n / log L)) or Llama 4's (1 + 0.1 log(floor(n / L) + 1)), L the training length;
- ``rope-pi``, ``rope-ntk``, ``rope-yarn``: the ``rope`` run evaluated with a training-free RoPE
  extension by the factor context / L (nothing is trained for them);
- ``swa`` (a window in every layer) and ``transformer`` (full attention): the controls. The
  Transformer's prefill is quadratic, so it is scored up to ``control_limit`` tokens only.

The whole study evaluates 6 contexts x 5 depths x ``trials`` prompts per run. ``--quick`` trains the
best option found (``QUICK_OPTION``) and ``rope`` and scores them at 64K and 1M, depths 0, 0.5 and 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import latest_checkpoint, load_model
from .config import get_config
from .data import TokenShards, load_tokenizer
from .evaluate import extrapolating, passkey_grid, plot_passkey, validation_loss
from .models import with_positions
from .report import write_json, write_markdown
from .study import match_ffn, parameter_count
from .tokenizer import TrainedTokenizer
from .train import TrainSettings, prepare_data, train

LONG_CONTEXTS = (1024, 4096, 16384, 65536, 262144, 1 << 20)
LONG_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUICK_CONTEXTS = (65536, 1 << 20)
QUICK_DEPTHS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class PositionOption:
    """A run of the study: the architecture, the position fields it trains with (given the training
    length), the ones added at evaluation only (given the context and the training length), and the
    run whose weights it evaluates (its own, or, for a training-free extension, the ``rope`` run's)."""

    arch: str
    trained: Callable[[int], dict] = lambda train_len: {}
    at_eval: Callable[[int, int], dict] = lambda context, train_len: {}
    weights_of: str | None = None  # another option's run


def _extension(kind: str) -> Callable[[int, int], dict]:
    def fields(context: int, train_len: int) -> dict:
        factor = context / train_len
        if factor <= 1:
            return {}  # inside the training length: plain RoPE
        return {"rope_extension": kind, "rope_factor": float(factor),
                **({"rope_original_len": train_len} if kind == "yarn" else {})}
    return fields


POSITION_OPTIONS: dict[str, PositionOption] = {
    "rope": PositionOption("yoco-swa"),
    "nope": PositionOption("yoco-swa", lambda n: {"global_position": "nope"}),
    "nope-log": PositionOption("yoco-swa", lambda n: {"global_position": "nope", "attn_temperature": "log",
                                                      "attn_train_len": n}),
    "nope-llama4": PositionOption("yoco-swa", lambda n: {"global_position": "nope", "attn_temperature": "llama4",
                                                         "attn_floor_scale": n}),
    "rope-pi": PositionOption("yoco-swa", at_eval=_extension("pi"), weights_of="rope"),
    "rope-ntk": PositionOption("yoco-swa", at_eval=_extension("ntk"), weights_of="rope"),
    "rope-yarn": PositionOption("yoco-swa", at_eval=_extension("yarn"), weights_of="rope"),
    "swa": PositionOption("swa"),
    "transformer": PositionOption("transformer"),
}
LONG_OPTIONS = tuple(POSITION_OPTIONS)
QUICK_OPTION = "nope-log"  # the best option of the whole study (README), trained and scored by --quick


@dataclass
class LongStudySettings:
    options: tuple[str, ...] = LONG_OPTIONS
    preset: str = "small"
    window: int = 64
    steps: int = 2200
    batch_size: int = 4
    seq_len: int = 1024
    short_seq_len: int | None = 256
    short_steps: int = 1500
    retrieval_mix: float = 0.5
    retrieval_tasks: tuple[str, ...] = ("passkey",)
    contexts: tuple[int, ...] = LONG_CONTEXTS
    depths: tuple[float, ...] = LONG_DEPTHS
    trials: int = 4
    # the longest context the quadratic Transformer control is scored at: it already retrieves nothing
    # beyond its training length at 4K and 16K (runs/long), and each 4x longer context costs ~16x more
    # (16K: 2.5 s a prompt; 64K: ~40 s, ~13 min for its 20 prompts)
    control_limit: int = 16384
    prefill_chunk: int = 16384
    corpus: list[str] = field(default_factory=list)
    vocab_size: int = TrainSettings.vocab_size
    seed: int = 0

    @classmethod
    def quick(cls, **changes) -> "LongStudySettings":
        return cls(**{"options": (QUICK_OPTION, "rope"), "contexts": QUICK_CONTEXTS, "depths": QUICK_DEPTHS,
                      **changes})

    def validate(self) -> None:
        from .config import ConfigError

        unknown = [o for o in self.options if o not in POSITION_OPTIONS]
        if unknown:
            raise ConfigError(f"unknown position option(s) {', '.join(unknown)}; choose from {', '.join(POSITION_OPTIONS)}")
        if not self.options or not self.contexts or not self.depths:
            raise ConfigError("a long study needs at least one option, context and depth")


def _trained_run(name: str) -> str:
    """The run folder an option's weights come from."""
    return POSITION_OPTIONS[name].weights_of or name


def _train_settings(name: str, settings: LongStudySettings, vocab: dict, target: int) -> TrainSettings:
    option = POSITION_OPTIONS[name]
    windowed = {"window": settings.window} if get_config(option.arch, settings.preset).window is not None else {}
    ffn, _ = match_ffn(option.arch, settings.preset, target, **vocab, **windowed)
    return TrainSettings(arch=option.arch, preset=settings.preset, corpus=settings.corpus,
                         vocab_size=settings.vocab_size, steps=settings.steps, batch_size=settings.batch_size,
                         seq_len=settings.seq_len, warmup=max(1, settings.steps // 20),
                         eval_every=max(1, settings.steps // 4), save_every=settings.steps,
                         log_every=max(1, settings.steps // 50), retrieval_mix=settings.retrieval_mix,
                         retrieval_tasks=settings.retrieval_tasks, short_seq_len=settings.short_seq_len,
                         short_steps=settings.short_steps if settings.short_seq_len else 0, seed=settings.seed,
                         overrides={"ffn_dim": ffn, **windowed, "max_seq_len": max(4096, settings.seq_len),
                                    **option.trained(settings.seq_len)})


def scored_contexts(name: str, settings: LongStudySettings) -> list[int]:
    """The contexts an option is scored at: all, but the quadratic control's up to ``control_limit``."""
    return [n for n in settings.contexts if name != "transformer" or n <= settings.control_limit]


def evaluate_option(name: str, model, tokenizer, haystack, settings: LongStudySettings,
                    log=print) -> tuple[list[dict], str | None]:
    """Passkey cells of one option at every context it is scored at, and why it stops short, if it does."""
    option = POSITION_OPTIONS[name]
    contexts = scored_contexts(name, settings)
    cells = []
    for context in contexts:
        added = option.at_eval(context, settings.seq_len)
        scored = with_positions(model, added)
        log(f"{name}: passkey at {context:,} tokens")
        with extrapolating(scored, context):
            grid = passkey_grid(scored, tokenizer, haystack, [context], settings.depths, settings.trials,
                                settings.seed, prefill_chunk=settings.prefill_chunk, progress=True)
        cells += [{**cell, "positions": added} for cell in grid]
    stopped = None
    if len(contexts) < len(settings.contexts):
        longest = max(contexts, default=0)
        beyond = min(n for n in settings.contexts if n > longest)
        per_prompt = (sum(c["seconds"] for c in cells if c["context"] == longest)
                      / max(1, sum(c["trials"] for c in cells if c["context"] == longest)))
        growth = (beyond / max(1, longest)) ** 2  # quadratic
        stopped = (f"scored up to {longest:,} tokens: its prefill is quadratic (a prompt of {longest:,} took "
                   f"{per_prompt:.1f} s here; one of {beyond:,} would take about {growth:.0f}x that, "
                   f"{per_prompt * growth / 60:.0f} min, and the longer contexts more)")
    return cells, stopped


def _settings_record(settings: LongStudySettings) -> dict:
    return {**settings.__dict__, "options": list(settings.options)}


def _finished_runs(path: Path, settings: LongStudySettings) -> dict[str, dict]:
    """The runs an earlier study at ``path`` evaluated with the same settings, by option; none if there
    is no such file, or it was written with other settings. The options and the control's limit aside:
    a run is kept when it was scored at the contexts these settings score it at."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = lambda record: {**record, "options": None, "control_limit": None}  # noqa: E731 - (those left out)
    if same(earlier.get("settings", {})) != same(json.loads(json.dumps(_settings_record(settings)))):
        return {}
    return {run["position"]: run for run in earlier.get("runs", [])
            if set(run.get("passkey_by_context", {})) == {str(n) for n in scored_contexts(run["position"], settings)}}


def _save(settings: LongStudySettings, runs: list[dict], seconds: float, out: Path, kept: list[str]) -> dict:
    """Written after every run (``complete`` false until the last): a study stopped halfway keeps what
    it measured, and a rerun takes it up from there. ``seconds`` is this invocation's time; ``kept``
    the runs it took from an earlier one (their time is not in it)."""
    results = {"settings": _settings_record(settings), "seconds": seconds,
               "complete": len(runs) == len(settings.options), "kept": kept, "runs": runs}
    write_json(results, out / "results.json")
    write_markdown(markdown(results), out / "results.md")
    return results


def run_long_study(settings: LongStudySettings, out: str | os.PathLike, log=print, progress: bool = True) -> dict:
    settings.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    prepare_data(TrainSettings(corpus=settings.corpus, vocab_size=settings.vocab_size, seq_len=settings.seq_len),
                 out / "data", log)
    vocab = {"vocab_size": load_tokenizer(out / "data").get_vocab_size()}
    # every run matched to the Transformer's parameters, as in `yoco study` (so the rope run is the
    # retrieval study's YOCO-SWA)
    target = parameter_count(get_config("transformer", settings.preset, **vocab))
    val = TokenShards(out / "data", "val")
    runs, kept = [], []
    finished = _finished_runs(out / "results.json", settings)
    for name in settings.options:
        if name in finished:
            # evaluated under these very settings by an earlier, interrupted study: kept, not redone (an
            # option's 1M-token cells take tens of minutes; delete results.json to evaluate again)
            log(f"{name}: evaluated before (results.json), kept")
            runs.append(finished[name])
            kept.append(name)
            results = _save(settings, runs, time.perf_counter() - began, out, kept)
            continue
        run_dir = out / _trained_run(name)
        # a finished training is not done again (an option evaluated with the rope run's weights reuses them)
        train(_train_settings(_trained_run(name), settings, vocab, target), run_dir,
              resume=(run_dir / "latest").exists(), log=log, progress=progress, data_dir=out / "data")
        model = load_model(latest_checkpoint(run_dir)).eval()
        tokenizer = TrainedTokenizer(out / "data", model.config.vocab_size)
        loss = validation_loss(model, val, settings.batch_size, settings.seq_len, None)
        started = time.perf_counter()
        cells, stopped = evaluate_option(name, model, tokenizer, val.tokens, settings, log)
        by_context = {}
        for c in cells:
            by_context.setdefault(str(c["context"]), []).append(c["accuracy"])
        run = {"arch": model.config.arch, "position": name, "train_len": settings.seq_len,
               "params": model.num_parameters(), "val_loss": loss["val_loss"], "val_tokens": loss["tokens"],
               "passkey_by_context": {n: sum(a) / len(a) for n, a in by_context.items()},
               "passkey_min_by_context": {n: min(a) for n, a in by_context.items()},
               "eval_seconds": time.perf_counter() - started,
               "peak_rss_bytes": max((c["peak_rss_bytes"] for c in cells if c["peak_rss_bytes"] is not None),
                                     default=None),
               "stopped": stopped, "cells": cells}
        runs.append(run)
        plot_passkey(cells, out / f"passkey-{name}.png",
                     f"passkey retrieval: {name} ({model.config.arch}, window {settings.window}), "
                     f"trained at {settings.seq_len} tokens")
        log(f"{name}: val loss {loss['val_loss']:.4f}; passkey " + ", ".join(
            f"{n}: {a:.0%}" for n, a in run["passkey_by_context"].items()))
        results = _save(settings, runs, time.perf_counter() - began, out, kept)
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    contexts = [str(n) for n in s["contexts"]]
    head = " | ".join(_context_label(int(n)) for n in contexts)
    lines = [f"Long study: preset {s['preset']}, window {s['window']}, trained at {s['seq_len']} tokens "
             f"({s['steps']} steps); passkey at depths {', '.join(f'{d:g}' for d in s['depths'])}, "
             f"{s['trials']} keys each; whole run {results['seconds'] / 60:.1f} min"
             + (f" in this invocation (runs kept from an earlier one, not counted: "
                f"{', '.join(results['kept'])})" if results.get("kept") else "")
             + ("" if results.get("complete", True) else f" so far ({len(results['runs'])} of {len(s['options'])} runs)"),
             "",
             f"| option | arch | val loss | {head} | min over depths at the longest | eval time |",
             "|---|---|---|" + "---|" * len(contexts) + "---|---|"]
    for r in results["runs"]:
        cells = " | ".join("-" if n not in r["passkey_by_context"] else f"{r['passkey_by_context'][n]:.0%}"
                           for n in contexts)
        longest = max(r["passkey_min_by_context"], key=int, default=None)
        worst = "-" if longest is None else f"{r['passkey_min_by_context'][longest]:.0%} at {_context_label(int(longest))}"
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(f"| {r['position']} | {r['arch']} | {loss} | {cells} | {worst} | {r['eval_seconds'] / 60:.1f} min |")
    notes = [f"- {r['position']}: {r['stopped']}" for r in results["runs"] if r["stopped"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _context_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


__all__ = ["LONG_CONTEXTS", "LONG_DEPTHS", "LongStudySettings", "POSITION_OPTIONS", "QUICK_OPTION", "markdown",
           "run_long_study"]
