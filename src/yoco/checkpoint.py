"""Saving and loading models: ``config.json`` + ``model.safetensors`` in a folder, written atomically;
the checkpoints of a training run folder (``checkpoint-<step>/`` and the ``latest`` pointer); any
model folder, yoco's or a transformers one, loaded for the commands that take either.

Each file is written to a temporary name in the same folder and moved into place with
``os.replace``, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .data import EOS
from .errors import YocoError
from .models import CausalLM, build_model, resolve_dtype
from .report import atomic_write
from .tokenizer import fingerprint, write_tokenizer_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys transformers writes into config.json that are not yoco model fields.
HF_BOOKKEEPING = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "tie_word_embeddings",
                  "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_hidden_states",
                  "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
                  "label2id", "problem_type", "_name_or_path", "tokenizer_class", "tokenizer_fingerprint"}


class CheckpointError(YocoError, RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a training run folder's ``latest`` points at (None when it has none yet)."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{str(pointer)!r} points at {str(path)!r}, which does not exist")
    return path


def resolve_checkpoint(directory: str | os.PathLike) -> Path:
    """A model folder; a training run folder stands for its latest checkpoint."""
    return latest_checkpoint(directory) or Path(directory)


def save_model(model: CausalLM, directory: str | os.PathLike, *, eos_token_id: int | None = None,
               tokenizer=None) -> Path:
    """Weights and config.json; `eos_token_id` (the tokenizer's end of text) lets transformers'
    ``generate`` stop there; `tokenizer` (the one saved beside the model) is recorded by its
    fingerprint, so that a folder holding another tokenizer is refused instead of misread."""
    directory = Path(directory)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; rebuilt by tying
    # Weights first, config last: a config always describes weights that are already complete.
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = config_json(model.config, eos_token_id, tokenizer)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def config_json(config: ModelConfig, eos_token_id: int | None = None, tokenizer=None) -> str:
    """config.json: the yoco fields plus what makes the folder a transformers one (``model_type``)."""
    from .hf import MODEL_TYPE

    data = {"model_type": MODEL_TYPE, "architectures": ["YocoForCausalLM"], **config.to_dict(),
            "tie_word_embeddings": config.tie_embeddings}
    if eos_token_id is not None:
        data["eos_token_id"] = eos_token_id
    if tokenizer is not None:
        data["tokenizer_fingerprint"] = fingerprint(tokenizer)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def load_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {str(directory)!r} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: not a yoco checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    from .hf import MODEL_TYPE

    model_type = data.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        hint = " (convert it: yoco convert --from-llama DIR --out OUT)" if model_type == "llama" else ""
        raise CheckpointError(f"{str(path)!r} describes a {model_type!r} model, not a yoco one{hint}")
    if "model_type" in data:  # a transformers folder: its bookkeeping keys are not model fields
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        data = {k: v for k, v in data.items() if k in fields or k not in HF_BOOKKEEPING}
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None


def load_model(directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device=None) -> CausalLM:
    directory = Path(directory)
    config = load_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: the checkpoint has a config but no weights")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is corrupt or truncated ({e})") from None
    if state and all(name.startswith("model.") for name in state):  # written by save_pretrained
        state = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    model = build_model(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not match its {config.arch} config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{str(path)!r}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_any_model(directory: str | os.PathLike, dtype: torch.dtype | str):
    """A yoco folder as a yoco model; a transformers Llama/Mistral/Qwen2 folder through the adapter
    that gives it the engine's model interface."""
    from .hf import MODEL_TYPE

    path = Path(directory)
    config, model_type = path / CONFIG_FILE, None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{str(config)!r} is not valid JSON ({e})") from None
    if model_type in (None, MODEL_TYPE):
        return load_model(path, dtype=dtype)  # which names what is missing
    from transformers import AutoModelForCausalLM

    from .hf_runner import TransformersLM

    return TransformersLM(AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)))


# ---------------------------------------------------------------------- training run folders
def save_checkpoint(run_dir: Path, step: int, model_state: dict, config: ModelConfig, tokenizer,
                    tokenizer_file: Path, trainer_state: dict) -> Path:
    """``checkpoint-<step>/`` in a training run folder, then ``latest`` pointed at it: the model with
    the run's `tokenizer_file` beside it (a transformers folder too) and ``trainer.pt`` holding
    `trainer_state` (what a resume continues from). The folder is written under a temporary name and
    renamed when complete, and ``latest`` is replaced in one step, so an interrupted save never leaves
    a half checkpoint behind ``latest``."""
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = build_model(config)
    model.load_state_dict(model_state)
    save_model(model, staging, eos_token_id=tokenizer.token_to_id(EOS), tokenizer=tokenizer)
    shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
    write_tokenizer_config(staging, tokenizer, config.max_seq_len)
    torch.save(trainer_state, staging / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    atomic_write(run_dir / "latest", lambda tmp: Path(tmp).write_text(final.name + "\n"))
    return final
