"""``yoco bench --train``: training tokens/s of this library's models beside transformers' ``Trainer``.

Each architecture trains on random token rows of every given length (batch, rows and steps alike for
all), in this one process, one after the other, row length by row length:

- this library's models (``transformer``, ``yoco-swa``, any of ``yoco kv-table``'s names) take the
  steps ``yoco train`` takes: a forward with the next-token loss (``evaluate.lm_loss``), backward,
  gradient clipping, and its AdamW (``train.optimizer_for``);
- ``hf-llama`` is transformers' ``Trainer`` on a ``LlamaForCausalLM`` of the Transformer's dimensions
  (the same AdamW settings and clipping, ``bf16`` when the run autocasts), as people train one: its
  data loader and callbacks are part of what it costs.

``--dtype bf16`` autocasts the matmuls to bf16 (weights and optimizer state stay fp32, as in ``yoco
train --bf16``); fp32 does not autocast. The first ``warmup`` steps are not timed: ``tok_s`` is the
tokens of the timed steps over the wall time from the end of the last warm-up step to the end of the
last step. The machine is probed before and after, as ``yoco bench`` does.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .bench import BenchError, PeakRSS, check_run, llama_model, probe_again, start_run
from .config import ModelConfig, get_config
from .evaluate import lm_loss
from .models import build_model, resolve_dtype
from .report import times
from .train import TrainSettings, optimizer_for

TRAIN_ARCHS = ("transformer", "yoco-swa", "hf-llama")
TRAIN_SEQ_LENS = (2048, 8192)


@dataclass
class TrainBenchSettings:
    archs: tuple[str, ...] = TRAIN_ARCHS
    seq_lens: tuple[int, ...] = TRAIN_SEQ_LENS
    preset: str = "40m"
    dtype: str = "bf16"  # bf16: autocast; fp32: none
    batch_size: int = 1
    steps: int = 4  # timed
    warmup: int = 1  # untimed steps first
    activation_checkpointing: bool = False
    threads: int = 0
    seed: int = 0

    def validate(self) -> None:
        check_run(self, self.seq_lens, "row lengths", ("batch_size", "steps", "warmup"))

    @property
    def bf16(self) -> bool:
        return resolve_dtype(self.dtype) == torch.bfloat16


def train_config(arch: str, settings: TrainBenchSettings) -> ModelConfig:
    """The yoco config of ``arch`` (hf-llama: the Transformer's, whose dimensions it takes), long enough
    for the longest row."""
    config = get_config("transformer" if arch == "hf-llama" else arch, settings.preset)
    longest = max(settings.seq_lens)
    return config.replace(max_seq_len=longest) if config.max_seq_len < longest else config


def random_rows(config: ModelConfig, settings: TrainBenchSettings, seq_len: int, step: int) -> torch.Tensor:
    """``batch_size`` rows of ``seq_len + 1`` random tokens (inputs and their next tokens), by step."""
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    return torch.randint(0, config.vocab_size, (settings.batch_size, seq_len + 1), generator=generator)


def optimizer_settings() -> TrainSettings:
    """The learning rate, decay, betas and clipping ``yoco train`` uses by default: both sides train
    with them."""
    return TrainSettings()


def yoco_training(config: ModelConfig, settings: TrainBenchSettings, seq_len: int):
    """One of this library's models built from ``config`` and the step ``yoco train`` takes on it:
    ``step(i)`` trains on the i-th batch of random rows (forward with the loss, backward, clipping, AdamW).
    Returns the model and the step."""
    model = build_model(config, seed=settings.seed).train()
    model.set_activation_checkpointing(settings.activation_checkpointing)
    ours = optimizer_settings()
    optimizer = optimizer_for(model, ours)

    def step(i: int) -> None:
        rows = random_rows(config, settings, seq_len, i)
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, rows[:, :-1], rows[:, 1:], settings.bf16).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ours.grad_clip)
        optimizer.step()

    return model, step


def time_yoco(arch: str, config: ModelConfig, settings: TrainBenchSettings, seq_len: int) -> tuple[list[float], int]:
    """Wall times of each step of one of this library's models, and its parameter count."""
    model, step = yoco_training(config, settings, seq_len)
    ends = []
    for i in range(settings.warmup + settings.steps):
        step(i)
        ends.append(time.perf_counter())
    return ends, model.num_parameters()


def time_trainer(config: ModelConfig, settings: TrainBenchSettings, seq_len: int) -> tuple[list[float], int]:
    """Wall times of each step of transformers' Trainer on a LlamaForCausalLM of ``config``'s dimensions."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    model = llama_model(config, torch.float32, settings.seed).train()
    if settings.activation_checkpointing:
        model.gradient_checkpointing_enable()
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return (settings.warmup + settings.steps) * settings.batch_size

        def __getitem__(self, i):
            # the same tokens as this library's side: row i % batch of step i // batch
            row = random_rows(config, settings, seq_len, i // settings.batch_size)[i % settings.batch_size, :-1]
            return {"input_ids": row, "labels": row}  # (Llama shifts the labels itself)

    ours = optimizer_settings()
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=settings.batch_size, max_steps=settings.warmup + settings.steps,
            learning_rate=ours.lr, weight_decay=ours.weight_decay, adam_beta1=ours.betas[0], adam_beta2=ours.betas[1],
            max_grad_norm=ours.grad_clip, lr_scheduler_type="constant", bf16=settings.bf16, use_cpu=True,
            report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=settings.seed)
        trainer = Trainer(model=model, args=arguments, train_dataset=Rows(), callbacks=[StepEnds()])
        trainer.remove_callback(PrinterCallback)  # (it prints the run's summary dict over the progress bar)
        trainer.train()
    return ends, model.num_parameters()


def measure_training(arch: str, settings: TrainBenchSettings, seq_len: int) -> dict:
    config = train_config(arch, settings)
    with PeakRSS() as peak:
        ends, params = (time_trainer(config, settings, seq_len) if arch == "hf-llama"
                        else time_yoco(arch, config, settings, seq_len))
    if len(ends) != settings.warmup + settings.steps:
        raise BenchError(f"{arch} ran {len(ends)} steps, not {settings.warmup + settings.steps}")
    timed = ends[-1] - ends[settings.warmup - 1]
    tokens = settings.steps * settings.batch_size * seq_len
    return {"arch": arch, "seq_len": seq_len, "batch_size": settings.batch_size, "params": params,
            "step_s": timed / settings.steps, "tok_s": tokens / timed, "peak_mem_bytes": peak.growth}


def run_train_bench(settings: TrainBenchSettings, log=print) -> dict:
    from tqdm import tqdm

    started, dtype, machine = start_run(settings, log)
    plan = [(n, a) for n in sorted(set(settings.seq_lens)) for a in settings.archs]
    results = []
    bar = tqdm(plan, desc="bench --train", unit="run", dynamic_ncols=True)
    for seq_len, arch in bar:
        bar.set_postfix_str(f"{arch} @ {seq_len}")
        results.append(measure_training(arch, settings, seq_len))
    bar.close()
    probe_again(machine, dtype)
    record = asdict(settings)
    record["archs"], record["seq_lens"] = list(settings.archs), sorted(set(settings.seq_lens))
    return {"machine": machine, "settings": record, "results": results, "wall_s": time.perf_counter() - started}


TRAIN_TABLE_HEADERS = ["arch", "row tokens", "batch", "params", "step s", "tok/s", "peak mem"]


def train_table_rows(report: dict) -> list[list[str]]:
    from .report import format_bytes

    return [[r["arch"], str(r["seq_len"]), str(r["batch_size"]), f"{r['params'] / 1e6:.1f}M", f"{r['step_s']:.2f}",
             f"{r['tok_s']:.0f}", format_bytes(r["peak_mem_bytes"], 1)] for r in report["results"]]


def train_ratio_rows(report: dict) -> list[str]:
    """The Transformer against transformers' Trainer, and YOCO-SWA against the Transformer, per length."""
    by = {(r["arch"], r["seq_len"]): r for r in report["results"]}
    lines = []
    for seq_len in report["settings"]["seq_lens"]:
        for arch, base in (("transformer", "hf-llama"), ("yoco-swa", "transformer")):
            a, b = by.get((arch, seq_len)), by.get((base, seq_len))
            if a and b and not math.isclose(b["tok_s"], 0):
                lines.append(f"training {arch} vs {base} @ {seq_len}-token rows: "
                             f"{times(a['tok_s'] / b['tok_s'], 'faster', 'slower')}")
    return lines


__all__ = ["TRAIN_ARCHS", "TRAIN_SEQ_LENS", "TrainBenchSettings", "run_train_bench", "train_ratio_rows",
           "train_table_rows"]
