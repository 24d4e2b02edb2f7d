"""``yoco serve``: an OpenAI-compatible server with continuous batching for a yoco model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..arguments import POSITIVE, POSITIVE_INT, budget
from ..serve.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAITING, DEFAULT_PREFILL_CHUNK, Scheduler
from .common import UsageError, add_dtype, add_kv_quantization, kv_quantization

GIB = 1 << 30


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over OpenAI's completions API, batching requests "
                                            "continuously")
    p.add_argument("model", metavar="DIR", help="a yoco model folder (config.json + model.safetensors), or a "
                                                "training run folder for its latest checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=POSITIVE_INT, default=8000, help="port to listen on")
    p.add_argument("--kv-budget-gib", type=POSITIVE, default=1.0,
                   help="GiB the live sequences' caches may hold at most; a request is admitted when what it can "
                        "grow to (prompt + max_tokens) fits")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=DEFAULT_MAX_BATCH, help="sequences running at once at most")
    p.add_argument("--max-waiting", type=POSITIVE_INT, default=DEFAULT_MAX_WAITING,
                   help="requests that may wait for room; beyond them the server answers 503")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens per prefill call, one call between two decode steps of the running sequences: "
                        "larger admits new sequences faster, smaller keeps their inter-token latency lower")
    p.add_argument("--compression", help="a yoco.compress policy every sequence's cache uses, name[:option=value] "
                                         "(e.g. snapkv, h2o, infllm)")
    p.add_argument("--compression-budget", type=budget, default=0.25,
                   help="the policy's budget: a ratio of each prompt in (0, 1], a token count, or none")
    p.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    add_kv_quantization(p)
    add_dtype(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 (the extra's presence, checked before the model loads)

        from ..serve.app import create_app, serve_forever
    except ImportError as e:
        raise UsageError(f"yoco serve needs the serve extra ({e.name} is missing): pip install 'yoco[serve]'") from None
    from ..checkpoint import load_model, resolve_checkpoint
    from ..tokenizer import tokenizer_for

    folder = resolve_checkpoint(args.model)
    model = load_model(folder, dtype=args.dtype).eval()
    tokenizer = tokenizer_for(folder, model.config.vocab_size)
    compression = compression_policy(args.compression, args.compression_budget) if args.compression else None
    kv_budget = int(args.kv_budget_gib * GIB)
    scheduler = Scheduler(model, tokenizer, kv_budget=kv_budget, max_batch=args.max_batch,
                          prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting, compression=compression,
                          kv_bits=kv_quantization(args))
    name = args.name or Path(args.model).resolve().name
    template, special = chat_template(folder)
    app = create_app(scheduler, name, chat_template=template, special_tokens=special, scheduler_thread=False)
    one_sequence = scheduler.reservation(min(model.config.max_seq_len, 4096))
    serve_forever(app, scheduler, args.host, args.port,
                  banner=f"yoco serve: {name} ({model.config.arch}, {model.num_parameters() / 1e6:.1f}M params) on "
                         f"http://{args.host}:{args.port}/v1, KV budget {args.kv_budget_gib:g} GiB "
                         f"({kv_budget // one_sequence} sequences of 4K positions)")
    return 0


def compression_policy(spec: str, amount):
    """The policy of ``--compression``; a ratio budget must not depend on a context fixed in advance."""
    from ..compress.policies import policy_for_context

    if spec.split(":")[0].lower() == "infllm" and isinstance(amount, float) and amount <= 1:
        raise UsageError("InfLLM's budget is its attention window in tokens, fixed before any prompt: give "
                         "--compression-budget a token count")
    return policy_for_context(spec, amount, 1)


def chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template of the folder's ``tokenizer_config.json`` (None: none), and the special tokens
    a template may use (``eos_token``, ``bos_token``)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None, {}
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{str(path)!r} is not valid JSON ({e})") from None
    special = {k: v for k, v in config.items() if k in ("eos_token", "bos_token") and isinstance(v, str)}
    template = config.get("chat_template")
    return (template if isinstance(template, str) else None), special
