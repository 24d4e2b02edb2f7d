"""The load benchmark's peer, transformers' own OpenAI-compatible server, and the server subprocesses
the benchmark starts (the peer and ``yoco serve`` alike).

- ``write_llama_folder``: a transformers ``LlamaForCausalLM`` of a yoco preset's Transformer
  dimensions (random weights) with a trained tokenizer, in a local folder ``transformers serve``
  loads offline;
- ``hf_serve_command``: the argv of ``transformers serve FOLDER --continuous-batching --device cpu``
  with its paged cache sized to a KV budget (``--cb-num-blocks``);
- ``start_server`` (a context manager) / ``launch_server``: a server subprocess, logged to a file,
  polled until it answers, stopped within bounded time; ``peak_rss_bytes`` its memory high-water mark.

What transformers 5.24's server takes (read from its source, checked by running it): the model is
named in a request by the very string given to ``transformers serve`` (a local path is kept as it
is; any other ``model`` answers 400 on a pinned server), a ``/v1/completions`` prompt is text only
(a list of token ids answers 400), and a request field outside OpenAI's schema answers 422
(``ignore_eos`` among them; ``stream_options`` is accepted and ignored). A stream sends one chunk per
token that completes whole characters (see ``non_text_tokens``), then a last chunk with an empty
text, the ``finish_reason`` and ``usage``, whether ``include_usage`` was asked or not. It has
``/v1/completions``, ``/v1/models`` and ``/health``; ``/v1/chat/completions`` and ``/v1/responses``
need a chat template (this folder has none: they answer 500), and there is no ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import torch

from ..bench import vm_hwm
from ..config import get_config
from ..errors import YocoError
from ..models import resolve_dtype

# The peer's paged cache page: transformers' default (``ContinuousBatchingConfig.page_size``).
DEFAULT_BLOCK_SIZE = 256
# Tokens of one forward of the peer. transformers' default, 8192, was the slowest measured on this CPU:
# 2 concurrent 2K-token prompts + 32 new tokens (1 GiB KV budget, SDPA) took 7.3-7.9 s at 8192 and
# 6.6-7.4 s at 4096, one 8K-token prompt 21 s and 15-17 s (2048: 14 s; 1024: 18 s). 16384 does not
# start: transformers plans an attention mask of max_batch_tokens x (cache tokens + max_batch_tokens)
# floats, 16384 x 103,680 x 4 B = 6.8 GB at a 1 GiB budget, more than the memory it allows itself.
DEFAULT_MAX_BATCH_TOKENS = 4096

# The peer never needs the Hub: the model is a local folder, and the CLI's PyPI update check is skipped.
# The command sets them itself (``env NAME=VALUE ... python``: ``env`` execs, so the pid is the server's).
HF_SERVE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class ServerError(YocoError, RuntimeError):
    """A server subprocess that did not start, did not answer in time or a bad server setting; the
    message names it (and the log file to read)."""


# ---------------------------------------------------------------------- the peer's model folder
def write_llama_folder(folder: str | os.PathLike, tokenizer, *, preset: str = "40m", seed: int = 0,
                       max_seq_len: int | None = None, text_tokens_only: bool = True, **overrides) -> Path:
    """A local transformers folder for ``transformers serve``: ``LlamaForCausalLM`` with the
    dimensions of yoco's ``transformer`` config of `preset` (``yoco.bench.llama_model``: the model
    ``yoco bench`` compares with), random weights from `seed`, fp32, saved with ``save_pretrained``,
    and `tokenizer` (a ``tokenizers.Tokenizer``, or the path of a ``tokenizer.json`` or of a folder
    holding one) as ``tokenizer.json`` + ``tokenizer_config.json``. `max_seq_len` (default: the
    preset's) is the model's ``max_position_embeddings`` and the tokenizer's ``model_max_length``;
    `overrides` replace other fields of the config (``vocab_size``, ``n_layers``...).
    `text_tokens_only` zeroes the output rows of the tokens that are not text on their own
    (``non_text_tokens``): see there why.

    The folder is written under a temporary name beside `folder` and renamed when complete (an
    existing folder is moved aside first and removed after), so a reader never sees half a folder."""
    from ..bench import llama_model
    from ..data import EOS, PAD, load_tokenizer
    from ..tokenizer import save_tokenizer

    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    config = get_config("transformer", preset, **overrides)
    if not isinstance(tokenizer, (str, os.PathLike)):
        vocab = tokenizer.get_vocab_size()
        if vocab > config.vocab_size:
            raise ServerError(f"the tokenizer has {vocab} tokens but the model's vocabulary ({preset} preset) is "
                              f"{config.vocab_size}: train it with vocab_size <= {config.vocab_size}")
    else:
        tokenizer = load_tokenizer(tokenizer, config.vocab_size, require_eos=False)
    model = llama_model(config, torch.float32, seed)
    # Generation stops at the tokenizer's end of text, as it does for a yoco checkpoint; Llama's
    # default ids (bos 1, eos 2) would be ordinary tokens of this tokenizer.
    special = {"bos_token_id": None, "eos_token_id": tokenizer.token_to_id(EOS), "pad_token_id": tokenizer.token_to_id(PAD)}
    for name, value in special.items():
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)
    if text_tokens_only:
        with torch.no_grad():
            model.lm_head.weight[non_text_tokens(tokenizer, config.vocab_size)] = 0

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's folder is private; a model folder is not
        model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging, config.max_seq_len)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def non_text_tokens(tokenizer, vocab_size: int) -> list[int]:
    """The ids below `vocab_size` that do not decode to text alone: a lone byte of a multi-byte UTF-8
    character, a special token, an id the tokenizer does not have.

    Why they matter: transformers' server streams a chunk only once the tokens so far decode to whole
    characters, and a random model's greedy choice is often one such byte, repeated (the 40m Llama
    with seed 0 answers 0xC7 sixteen times: a stream of no chunk at all), or the end of text (a stream
    that stops early). With their output rows zeroed, their logit is 0 while the other logits are
    spread around 0, so a greedy stream is one chunk per token and runs to ``max_tokens``, and what
    each step computes is unchanged. Sampling can still pick them."""
    return [i for i in range(vocab_size)
            if i >= tokenizer.get_vocab_size() or not is_text(tokenizer.decode([i]))]


def is_text(decoded: str) -> bool:
    return decoded != "" and "\ufffd" not in decoded


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(staging: Path, folder: Path) -> None:
    """Put the complete folder `staging` at `folder`, replacing what is there."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    os.replace(folder, aside / folder.name)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------- the peer's command
def llama_kv_bytes_per_token(folder: str | os.PathLike, dtype: str | torch.dtype = "fp32") -> int:
    """K and V bytes one token takes in every layer of the folder's Llama, in `dtype`:
    2 x layers x kv_heads x head_dim x bytes per element (what transformers' paged cache stores)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except (OSError, ValueError, KeyError) as e:
        raise ServerError(f"{str(path)!r} is not a transformers Llama config.json ({e!r})") from None
    return 2 * layers * kv_heads * head_dim * resolve_dtype(dtype).itemsize


def hf_cache_blocks(folder: str | os.PathLike, kv_budget_bytes: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                    dtype: str | torch.dtype = "fp32") -> int:
    """The most blocks of `block_size` tokens whose K/V (``llama_kv_bytes_per_token``) fits
    `kv_budget_bytes`: the peer's ``--cb-num-blocks``."""
    if block_size < 4:
        raise ServerError(f"block_size={block_size}: transformers' paged cache needs pages of at least 4 tokens")
    bytes_per_block = block_size * llama_kv_bytes_per_token(folder, dtype)
    num_blocks = kv_budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ServerError(f"a KV budget of {kv_budget_bytes} bytes holds no block of {block_size} tokens "
                          f"({bytes_per_block} bytes for this model in {dtype})")
    return num_blocks


def hf_serve_unsupported() -> str | None:
    """Why the installed transformers cannot be the peer (None when it can): its server needs
    ``/v1/completions`` and the ``--cb-*`` options (transformers 5.24 has both; 5.4, this project's
    oldest, has neither), and FastAPI, uvicorn, pydantic and openai (the ``serve`` extra)."""
    import importlib.util
    import inspect

    import transformers

    found = f"transformers {transformers.__version__}"
    try:
        from transformers.cli.serve import Serve
    except ImportError as e:
        return f"{found} has no `transformers serve` ({e})"
    options = inspect.signature(Serve.__init__).parameters
    missing = [name for name in ("continuous_batching", "cb_block_size", "cb_num_blocks", "cb_max_batch_tokens")
               if name not in options]
    if missing:
        return f"{found}'s `transformers serve` has no --{', --'.join(n.replace('_', '-') for n in missing)}"
    if importlib.util.find_spec("transformers.cli.serving.completion") is None:
        return f"{found}'s `transformers serve` has no /v1/completions"
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return f"{found}'s `transformers serve` needs FastAPI, uvicorn, pydantic and openai: install yoco[serve]"
    return None


def hf_model_name(folder: str | os.PathLike) -> str:
    """How requests to the peer name its model: the exact string ``hf_serve_command`` gives
    ``transformers serve`` (the folder's absolute path)."""
    return str(Path(folder).resolve())


def hf_serve_command(folder: str | os.PathLike, *, host: str = "127.0.0.1", port: int, kv_budget_bytes: int,
                     block_size: int = DEFAULT_BLOCK_SIZE, attn_implementation: str = "sdpa",
                     max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, dtype: str | torch.dtype = "fp32",
                     log_level: str = "info") -> list[str]:
    """The argv of transformers' server for the Llama in `folder`, on the CPU with continuous batching,
    its paged cache the most blocks of `block_size` tokens that fit `kv_budget_bytes`
    (``hf_cache_blocks``); a transformers that cannot serve it is refused (``hf_serve_unsupported``).
    `attn_implementation` is what the model loads with (``sdpa``, or ``eager``,
    which continuous batching turns into ``paged|eager``); `max_batch_tokens` caps the tokens of one
    forward (None: transformers' default, 8192). The defaults are the fastest settings measured here
    (``DEFAULT_MAX_BATCH_TOKENS``). The command runs offline (``HF_SERVE_ENV``)."""
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ServerError(f"max_batch_tokens={max_batch_tokens} must be at least 1")
    num_blocks = hf_cache_blocks(folder, kv_budget_bytes, block_size=block_size, dtype=dtype)
    reason = hf_serve_unsupported()
    if reason is not None:
        raise ServerError(f"transformers cannot be the peer here: {reason}")
    argv = ["env", *(f"{k}={v}" for k, v in HF_SERVE_ENV.items()),
            sys.executable, "-m", "transformers.cli.transformers", "serve", hf_model_name(folder),
            "--continuous-batching", "--device", "cpu", "--dtype", str(resolve_dtype(dtype)).removeprefix("torch."),
            "--attn-implementation", attn_implementation,
            "--cb-block-size", str(block_size), "--cb-num-blocks", str(num_blocks),
            "--host", host, "--port", str(port), "--log-level", log_level]
    if max_batch_tokens is not None:
        argv += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    return argv


# ---------------------------------------------------------------------- server subprocesses
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A started server: its subprocess, the URL that says it answers, and its log file."""

    argv: list[str]
    health_url: str
    log_path: Path
    process: subprocess.Popen
    # VmHWM read just before the server was stopped by ``start_server`` (None until then)
    peak_rss_at_stop: int | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_bytes(self) -> int | None:
        return peak_rss_bytes(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the server's process group, then SIGKILL after `timeout` seconds; its exit code."""
        return stop_process(self.process, timeout)


@contextlib.contextmanager
def start_server(argv: list[str], health_url: str, timeout: float, log_path: str | os.PathLike | None = None, *,
                 env: dict[str, str] | None = None, stop_timeout: float = 10.0) -> Iterator[ServerProcess]:
    """``launch_server``, yield it, then read its peak RSS (``peak_rss_at_stop``) and stop it."""
    server = launch_server(argv, health_url, timeout, log_path, env=env)
    try:
        yield server
    finally:
        server.peak_rss_at_stop = server.peak_rss_bytes()
        server.stop(stop_timeout)


def launch_server(argv: list[str], health_url: str, timeout: float, log_path: str | os.PathLike | None = None, *,
                  env: dict[str, str] | None = None, poll_interval: float = 0.25) -> ServerProcess:
    """Start `argv` (stdout and stderr to `log_path`, a new file in a temporary folder by default;
    `env` added to this process's environment) and wait until a GET of `health_url` answers 200.
    A server that exits first, or does not answer within `timeout` seconds (it is then stopped),
    raises ServerError naming the log file."""
    if not argv:
        raise ServerError("no server command given")
    if timeout <= 0:
        raise ServerError(f"timeout={timeout}: a server needs a positive time to start")
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="yoco-server-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            # its own session: stopping it reaches whatever it starts, and a Ctrl-C here does not reach it twice
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **(env or {})}, start_new_session=True)
        except OSError as e:
            raise ServerError(f"cannot run {argv[0]!r}: {e.strerror}") from None
    server = ServerProcess(list(argv), health_url, log_path, process)
    try:
        wait_until_answering(server, timeout, poll_interval)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_answering(server: ServerProcess, timeout: float, poll_interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            raise ServerError(f"server exited with status {code} before answering at {server.health_url}; "
                              f"its log is {str(server.log_path)!r}:\n{server.log_tail()}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerError(f"server did not answer at {server.health_url} within {timeout:g} s; "
                              f"its log is {str(server.log_path)!r}:\n{server.log_tail()}")
        if answers(server.health_url, min(2.0, left)):
            return
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))


def answers(url: str, timeout: float) -> bool:
    """Whether a GET of `url` answers 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM to the process group `process` leads, SIGKILL if it still runs after `timeout` s."""
    if process.poll() is not None:
        return process.returncode
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return process.poll()


def peak_rss_bytes(pid: int) -> int | None:
    """The resident-memory high-water mark (``VmHWM``) of process `pid` plus those of its descendants
    (a sum of peaks, so an upper bound when they peak at different times); None where /proc does not
    tell it (not Linux, or the process is gone)."""
    try:
        pids = [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None
    peaks = [vm_hwm(p) for p in pids]
    if peaks[0] is None:
        return None
    return sum(p for p in peaks if p is not None)


__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_MAX_BATCH_TOKENS", "HF_SERVE_ENV", "ServerError", "ServerProcess",
           "free_port", "hf_cache_blocks", "hf_model_name", "hf_serve_command", "hf_serve_unsupported",
           "launch_server", "llama_kv_bytes_per_token", "non_text_tokens", "peak_rss_bytes", "start_server",
           "stop_process", "write_llama_folder"]
