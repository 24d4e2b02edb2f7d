"""Training any yoco architecture on token shards, in one process or several (``torchrun --nproc_per_node=N
-m yoco.train ...``: data parallel, see ``parallel.py``).

A run folder holds ``data/`` (tokenizer.json + shards, built once), ``metrics.jsonl`` (one line per
logged step or evaluation) and checkpoints ``checkpoint-<step>/`` (model.safetensors + config.json +
tokenizer.json + trainer.pt with optimizer, schedule and step). A checkpoint folder is written under a
temporary name and renamed when complete, then ``latest`` is pointed at it (itself replaced
atomically), so an interrupted save never leaves a half checkpoint behind ``latest``. Batches depend
only on (seed, step), so ``resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write, load_model, save_model
from .config import get_config
from .data import EOS, SPECIAL_TOKENS, TokenShards, build_shards, corpus_documents, load_tokenizer, train_tokenizer
from .evaluate import lm_loss, validation_loss
from .models import CausalLM, build_model
from .parallel import (barrier, close, full_state, init_world, load_optimizer_state, mean_over_world, scalar,
                       shard_rows, sharded, wrap)


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
    retrieval_mix: float = 0.0  # share of every batch given to synthetic passkey / copy / MQAR rows
    val_percent: float = 2.0
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint whose weights start the run (fine-tuning, curricula)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.retrieval_mix <= 1:
            raise ValueError(f"retrieval-mix must be within [0, 1], got {self.retrieval_mix}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0 or self.grad_clip <= 0:
            raise ValueError("need lr > 0, 0 <= min-lr-ratio <= 1, warmup >= 0 and grad-clip > 0")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_data(settings: TrainSettings, data_dir: Path, log=print) -> Path:
    """Tokenizer and shards in data_dir, built once (reused when present and complete)."""
    if (data_dir / "meta.json").is_file() and (data_dir / "tokenizer.json").is_file():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"training a {settings.vocab_size}-token byte-level BPE on "
        f"{', '.join(settings.corpus) if settings.corpus else 'the Python standard library sources'}...")
    tokenizer = train_tokenizer((d.text for d in corpus_documents(settings.corpus)), settings.vocab_size)
    atomic_write(data_dir / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    build_shards(corpus_documents(settings.corpus), tokenizer, data_dir, val_percent=settings.val_percent)
    return data_dir


def passkey_row(encode, haystack, length: int, rng, max_questions: int = 4) -> list[int] | None:
    """A training passkey sequence of exactly `length` tokens, ending with the evaluation prompt's
    question and its answer: corpus text with the needle at a random point and up to `max_questions`
    question + answer pairs after it, the last one at the end. More than one question gives the far
    copy more gradient per row (the answers are the only tokens that need the global cache). None
    when even one question does not fit, or the haystack is too short."""
    from .evaluate import passkey_parts

    needle, question, answer = passkey_parts(encode, str(rng.randrange(10000, 100000)))
    qa = question + answer
    questions = next((k for k in range(max_questions, 0, -1) if length - len(needle) - k * len(qa) >= 0), 0)
    filler = length - len(needle) - questions * len(qa)
    if questions == 0 or len(haystack) < filler:
        return None
    start = rng.randrange(0, len(haystack) - filler + 1)
    text = [int(t) for t in haystack[start:start + filler]]
    at = rng.randrange(0, filler + 1)
    points = sorted(rng.randrange(at, filler + 1) for _ in range(questions - 1)) + [filler]
    row, previous = text[:at] + needle, at
    for point in points:
        row += text[previous:point] + qa
        previous = point
    return row


def copy_row(haystack, length: int, rng) -> list[int] | None:
    """A training sequence of exactly `length` corpus tokens in which a span reappears later, at a
    random distance: every token of the repeat is predictable only by finding the first occurrence.
    This is the induction (copy-from-context) signal that passkey retrieval is made of, with up to a
    quarter of the row as targets instead of a passkey's few answer tokens. None when the haystack is
    too short."""
    if length < 8 or len(haystack) < length:
        return None
    span = rng.randrange(4, length // 4 + 1)
    first = rng.randrange(0, length - 2 * span + 1)
    second = rng.randrange(first + span, length - span + 1)
    start = rng.randrange(0, len(haystack) - length + 1)
    text = [int(t) for t in haystack[start:start + length]]
    return text[:second] + text[first:first + span] + text[second + span:]


def retrieval_rows(n: int, seq_len: int, step: int, seed: int, tokenizer, haystack) -> torch.Tensor:
    """n synthetic retrieval sequences of seq_len + 1 tokens, fixed by (seed, step), taking turns: a
    passkey row (`passkey_row`), a copy row (`copy_row`) and an MQAR sequence (also standing in for the
    others when the sequence is too short for them)."""
    import random

    from .evaluate import mqar_batch

    rng = random.Random(f"{seed}:{step}")
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(EOS)
    rows = []
    for i in range(n):
        row = None
        if i % 3 == 0:
            row = passkey_row(lambda t: tokenizer.encode(t).ids, haystack, seq_len + 1, rng)
        elif i % 3 == 1:
            row = copy_row(haystack, seq_len + 1, rng)
        if row is None:
            pairs = max(1, (seq_len + 1) // 4)
            ids, _ = mqar_batch(1, pairs, pairs, range(len(SPECIAL_TOKENS), vocab), seed=rng.randrange(1 << 30))
            row = ids[0].tolist()[: seq_len + 1]
            row += [eos] * (seq_len + 1 - len(row))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def initial_weights(checkpoint: Path, config, data_dir: Path) -> CausalLM:
    """The model saved in `checkpoint`, checked to fit this run: the same config (the maximum length
    aside) and the same tokenizer. A run folder stands for its latest checkpoint."""
    if (checkpoint / "latest").is_file():
        checkpoint = latest_checkpoint(checkpoint)
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


def evaluate(model: CausalLM, val: TokenShards, settings: TrainSettings) -> float:
    loss = validation_loss(model, val, settings.batch_size, settings.seq_len, settings.eval_batches, settings.bf16)
    model.train()
    return loss["val_loss"]


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, model_state: dict, optim_state: dict, optimizer_format: str, step: int,
                    settings: TrainSettings, config, data_dir: Path) -> Path:
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = build_model(config)
    model.load_state_dict(model_state)
    save_model(model, staging)
    shutil.copyfile(data_dir / "tokenizer.json", staging / "tokenizer.json")
    torch.save({"step": step, "optimizer": optim_state, "optimizer_format": optimizer_format,
                "settings": asdict(settings)}, staging / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    atomic_write(run_dir / "latest", lambda tmp: Path(tmp).write_text(final.name + "\n"))
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{str(pointer)!r} points at {str(path)!r}, which does not exist")
    return path


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
    if world.size > 1 and settings.batch_size % world.size:
        raise ValueError(f"batch-size {settings.batch_size} must be divisible by the {world.size} processes")
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
    trained = wrap(model, world, settings.parallel)  # runs forward/backward (DDP, or the FSDP2-sharded model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=settings.betas)
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
                x, y = train_data.batch(step * settings.grad_accum + micro, settings.batch_size, settings.seq_len,
                                        settings.seed)
                mixed = round(settings.batch_size * settings.retrieval_mix)
                if mixed:  # the first rows of every batch become synthetic retrieval sequences
                    rows = retrieval_rows(mixed, settings.seq_len, step * settings.grad_accum + micro, settings.seed,
                                          tokenizer, train_data.tokens)
                    x, y = torch.cat([rows[:, :-1], x[mixed:]]), torch.cat([rows[:, 1:], y[mixed:]])
                x, y = shard_rows(x, world).to(world.device), shard_rows(y, world).to(world.device)
                loss = lm_loss(trained, x, y, settings.bf16) / settings.grad_accum
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
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            if done % settings.eval_every == 0 or done == settings.steps:
                last["val_loss"] = evaluate(model, val_data, settings)  # every process, same numbers
                metrics.write(json.dumps({"step": done, "val_loss": last["val_loss"]}) + "\n")
                metrics.flush()
            if done % settings.save_every == 0 or done == settings.steps or done == end:
                model_state, optim_state = full_state(model, optimizer, world, settings.parallel)
                if world.main:
                    save_checkpoint(run_dir, model_state, optim_state, optimizer_format, done, settings, config,
                                    data_dir)
                barrier(world)
    bar.close()
    close(world)
    return last


def main() -> None:
    """``python -m yoco.train`` (and so ``torchrun ... -m yoco.train``) takes ``yoco train``'s flags."""
    import sys

    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))


if __name__ == "__main__":
    main()


__all__ = ["TrainSettings", "latest_checkpoint", "lr_factor", "train"]
