"""Training any yoco architecture on token shards, in one process or several (``torchrun --nproc_per_node=N
-m yoco.train ...``, which takes ``yoco train``'s flags (``__main__.py``): data parallel, see
``parallel.py``).

A run folder holds ``data/`` (tokenizer.json + shards, built once), ``metrics.jsonl`` (one line per
logged step or evaluation) and checkpoints ``checkpoint-<step>/`` (model.safetensors + config.json +
tokenizer.json + trainer.pt with optimizer, schedule and step), each saved whole before ``latest``
points at it (``checkpoint.save_checkpoint``). Batches depend only on (seed, step), so ``resume``
continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, latest_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from ..config import get_config
from ..data import (DataError, TokenShards, build_shards, corpus_documents, is_shard_folder, load_tokenizer,
                    train_tokenizer)
from ..errors import YocoError
from ..evaluate import covered, lm_loss, validation_loss
from ..models import CausalLM, build_model
from ..parallel import (barrier, close, full_state, init_world, load_optimizer_state, mean_over_world, scalar,
                        shard_rows, sharded, wrap)
from ..report import atomic_write, json_text
from ..tasks import RETRIEVAL_TASKS, retrieval_rows


class SettingsError(YocoError, ValueError):
    """Training settings that cannot work together; the message names the option."""


@dataclass
class TrainSettings:
    arch: str = "yoco-swa"
    preset: str = "tiny"
    corpus: list[str] = field(default_factory=list)  # empty: the stdlib's own sources
    vocab_size: int = 4096
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bf16 (weights and optimizer stay fp32)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2-sharded)
    retrieval_mix: float = 0.0  # share of every batch given to synthetic retrieval rows
    retrieval_tasks: tuple[str, ...] = RETRIEVAL_TASKS  # the kinds of those rows, taking turns
    # A sequence-length curriculum: the first short_steps steps train on short_seq_len-token rows, as many
    # more of them as keep the tokens per step (retrieval is learned far faster on short rows).
    short_seq_len: int | None = None
    short_steps: int = 0
    val_percent: float = 2.0
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint whose weights start the run (fine-tuning, curricula)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (longer rows fit)

    def shape(self, step: int) -> tuple[int, int]:
        """(rows, tokens per row) of step `step`'s batch (per accumulation micro-step)."""
        if self.short_seq_len is not None and step < self.short_steps:
            return self.batch_size * self.seq_len // self.short_seq_len, self.short_seq_len
        return self.batch_size, self.seq_len

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.retrieval_mix <= 1:
            raise SettingsError(f"retrieval-mix must be within [0, 1], got {self.retrieval_mix}")
        unknown = [t for t in self.retrieval_tasks if t not in RETRIEVAL_TASKS]
        if unknown or not self.retrieval_tasks:
            raise SettingsError(f"retrieval-tasks must name some of {', '.join(RETRIEVAL_TASKS)}, got "
                             f"{', '.join(self.retrieval_tasks) or 'none'}")
        if self.short_seq_len is not None:
            if not 1 <= self.short_seq_len < self.seq_len or (self.batch_size * self.seq_len) % self.short_seq_len:
                raise SettingsError(f"short-seq-len must be shorter than seq-len ({self.seq_len}) and divide the "
                                 f"{self.batch_size * self.seq_len} tokens of a step, got {self.short_seq_len}")
            if not 1 <= self.short_steps <= self.steps:
                raise SettingsError(f"short-steps must be within [1, steps={self.steps}], got {self.short_steps}")
        elif self.short_steps:
            raise SettingsError("short-steps needs short-seq-len")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0 or self.grad_clip <= 0:
            raise SettingsError("need lr > 0, 0 <= min-lr-ratio <= 1, warmup >= 0 and grad-clip > 0")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_data(settings: TrainSettings, data_dir: Path, log=print) -> Path:
    """Tokenizer and shards in data_dir, built once (reused when present and complete)."""
    if is_shard_folder(data_dir) and (data_dir / "tokenizer.json").is_file():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"training a {settings.vocab_size}-token byte-level BPE on "
        f"{', '.join(settings.corpus) if settings.corpus else 'the Python standard library sources'}...")
    tokenizer = train_tokenizer((d.text for d in corpus_documents(settings.corpus)), settings.vocab_size)
    atomic_write(data_dir / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    build_shards(corpus_documents(settings.corpus), tokenizer, data_dir, val_percent=settings.val_percent,
                 min_val_tokens=settings.seq_len + 1)  # at least one validation row
    return data_dir


def loss_weights(batch_size: int, seq_len: int, targets: torch.Tensor) -> torch.Tensor:
    """Per-token weights [batch_size, seq_len] summing to 1 for a batch whose first rows are retrieval
    rows with target mask `targets` [rows, seq_len] and whose other rows are corpus text. Every row
    weighs 1 / batch_size: a text row spread over all its tokens, a retrieval row over its targets only
    (its haystack is corpus text the text rows already teach, and a few answer tokens diluted among a
    thousand text tokens leave a small model too little gradient to find the far copy)."""
    weights = torch.full((batch_size, seq_len), 1 / (batch_size * seq_len))
    weights[:len(targets)] = targets / (batch_size * targets.sum(1, keepdim=True).clamp(min=1))
    return weights


def initial_weights(checkpoint: Path, config, data_dir: Path) -> CausalLM:
    """The model saved in `checkpoint`, checked to fit this run: the same config (the maximum length
    aside) and the same tokenizer. A run folder stands for its latest checkpoint."""
    checkpoint = resolve_checkpoint(checkpoint)
    source = load_model(checkpoint)
    differ = [f"{k}={v!r} (the run has {getattr(config, k)!r})" for k, v in vars(source.config).items()
              if k != "max_seq_len" and getattr(config, k) != v]
    if differ:
        raise CheckpointError(f"{str(checkpoint)!r} cannot start this run, its model differs: " + ", ".join(differ))
    saved, ours = checkpoint / "tokenizer.json", data_dir / "tokenizer.json"
    if saved.is_file() and saved.read_text() != ours.read_text():
        raise CheckpointError(f"{str(checkpoint)!r} was trained with another tokenizer than {str(ours)!r}: "
                              "use the same corpus and vocabulary size")
    return source


def evaluate(model: CausalLM, val: TokenShards, settings: TrainSettings) -> dict:
    result = validation_loss(model, val, settings.batch_size, settings.seq_len, settings.eval_batches, settings.bf16)
    model.train()
    return result


def check_validation(val: TokenShards, settings: TrainSettings, data_dir: Path) -> None:
    """Refuse to train without a validation row (a loss over nothing would be NaN at every evaluation)."""
    if settings.val_percent > 0 and len(val) < settings.seq_len + 1:
        raise DataError(f"the validation split in {str(data_dir)!r} holds {len(val)} tokens, fewer than one row of "
                        f"seq-len + 1 = {settings.seq_len + 1}: the corpus is too small to hold a row out and still "
                        "train on the rest (give more text or a shorter --seq-len; a data folder built for shorter "
                        "rows is rebuilt once removed)")


def optimizer_for(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW at the settings' learning rate and betas, decaying matrices only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=settings.betas)


# ---------------------------------------------------------------------- the loop
def train(settings: TrainSettings, run_dir: str | os.PathLike, *, resume: bool = False, log=print,
          progress: bool = True, stop_after: int | None = None, data_dir: str | os.PathLike | None = None) -> dict:
    """Train (or resume) in run_dir; returns the final metrics. `data_dir` holds the tokenizer and shards
    (default run_dir/data; a study shares one). `stop_after` ends the process's work after that many
    steps without finishing the schedule (to test interruption)."""
    from tqdm import tqdm

    settings.validate()
    get_config(settings.arch, settings.preset, **settings.overrides)  # a bad combination fails before any data work
    world = init_world()
    if world.size > 1 and any(settings.shape(step)[0] % world.size for step in (0, settings.steps - 1)):
        raise SettingsError(f"batch-size {settings.batch_size} (and the short rows' count) must be divisible by the "
                         f"{world.size} processes")
    progress = progress and world.main
    log = log if world.main else (lambda text: None)
    run_dir = Path(run_dir)
    if not resume and (run_dir / "latest").exists():
        raise CheckpointError(f"run folder {str(run_dir)!r} already holds checkpoints: pass resume (--resume) to "
                              "continue it, or choose a new folder (nothing was overwritten)")
    data_dir = Path(data_dir) if data_dir is not None else run_dir / "data"
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_data(settings, data_dir, log)
    barrier(world)
    tokenizer = load_tokenizer(data_dir)
    config = get_config(settings.arch, settings.preset,
                        **{"vocab_size": tokenizer.get_vocab_size(), **settings.overrides})
    if config.max_seq_len < settings.seq_len:
        config = config.replace(max_seq_len=settings.seq_len)
    train_data, val_data = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    check_validation(val_data, settings, data_dir)
    log(f"validation loss every {settings.eval_every} steps over at most {settings.eval_batches} batches of "
        f"{settings.batch_size} x {settings.seq_len} tokens from the start of the held-out split "
        f"({len(val_data):,} tokens)")

    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        model = load_model(checkpoint)
        if model.config != config:
            raise CheckpointError(f"{str(checkpoint)!r} holds a {model.config.arch} model whose config differs "
                                  f"from this run's ({settings.arch}, preset {settings.preset}): resume with the same "
                                  f"architecture and settings, or start a new run folder")
        state = torch.load(checkpoint / "trainer.pt", weights_only=True)
        start = state["step"]
    else:
        if resume:
            log(f"no checkpoint in {run_dir}; starting from step 0")
        model = build_model(config, seed=settings.seed)
        if settings.init_from is not None:
            model.load_state_dict(initial_weights(Path(settings.init_from), config, data_dir).state_dict())
            log(f"weights from {settings.init_from}")
    model = model.to(world.device).train()
    model.set_activation_checkpointing(settings.activation_checkpointing)
    trained = wrap(model, world, settings.parallel)  # runs forward/backward (DDP, or the FSDP2-sharded model)
    optimizer = optimizer_for(model, settings)
    optimizer_format = "fsdp-full" if sharded(world, settings.parallel) else "torch"
    if checkpoint is not None:
        if state.get("optimizer_format", "torch") != optimizer_format:
            raise CheckpointError(f"{str(checkpoint)!r} holds {state.get('optimizer_format')} optimizer state but "
                                  f"this run needs {optimizer_format}: resume with the parallel mode that saved it")
        load_optimizer_state(model, optimizer, state["optimizer"], world, settings.parallel)
    metrics_path = run_dir / "metrics.jsonl"
    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    end = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"train {settings.arch}", initial=start, total=settings.steps,
               disable=not progress, dynamic_ncols=True)
    last = {}
    t0 = time.perf_counter()
    with open(metrics_path, "a") if world.main else open(os.devnull, "w") as metrics:
        for step in bar:
            factor = lr_factor(step, settings.warmup, settings.steps, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(settings.grad_accum):
                batch_size, seq_len = settings.shape(step)
                x, y = train_data.batch(step * settings.grad_accum + micro, batch_size, seq_len, settings.seed)
                mixed = round(batch_size * settings.retrieval_mix)
                rows, targets = retrieval_rows(mixed, seq_len, step * settings.grad_accum + micro, settings.seed,
                                               tokenizer, train_data.tokens, settings.retrieval_tasks)
                # The first rows of every batch become synthetic retrieval sequences.
                x, y = torch.cat([rows[:, :-1], x[mixed:]]), torch.cat([rows[:, 1:], y[mixed:]])
                weights = loss_weights(batch_size, seq_len, targets[:, 1:])
                x, y, weights = (shard_rows(t, world).to(world.device) for t in (x, y, weights))
                # Each process sums its rows' share; DDP/FSDP average gradients, hence the world size.
                loss = lm_loss(trained, x, y, settings.bf16, weights) * world.size / settings.grad_accum
                loss.backward()
                total += loss.item()
            total = mean_over_world(total, world)
            grad_norm = scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
            optimizer.step()
            done = step + 1
            elapsed = time.perf_counter() - t0
            last = {"step": done, "loss": total, "lr": settings.lr * factor, "grad_norm": grad_norm,
                    "tokens": done * tokens_per_step, "tok_s": (done - start) * tokens_per_step / elapsed}
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{last['tok_s']:.0f}")
            if done % settings.log_every == 0 or done == settings.steps:
                metrics.write(json_text(last, indent=None) + "\n")
                metrics.flush()
            if done % settings.eval_every == 0 or done == settings.steps:
                result = evaluate(model, val_data, settings)  # every process, same numbers
                last.update(val_loss=result["val_loss"], val_tokens=result["tokens"], val_covers=covered(result))
                metrics.write(json_text({"step": done, "val_loss": result["val_loss"], "val_tokens": result["tokens"],
                                         "val_split_tokens": result["split_tokens"]}, indent=None) + "\n")
                metrics.flush()
            if done % settings.save_every == 0 or done == settings.steps or done == end:
                model_state, optim_state = full_state(model, optimizer, world, settings.parallel)
                if world.main:
                    save_checkpoint(run_dir, done, model_state, config, tokenizer, data_dir / "tokenizer.json",
                                    {"step": done, "optimizer": optim_state, "optimizer_format": optimizer_format,
                                     "settings": asdict(settings)})
                barrier(world)
    bar.close()
    close(world)
    return last


__all__ = ["TrainSettings", "lr_factor", "optimizer_for", "train"]
