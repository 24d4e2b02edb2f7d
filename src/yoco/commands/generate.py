"""``yoco generate``: text or token ids from a model."""

from __future__ import annotations

import argparse
import sys

from ..arguments import NATURAL, NON_NEGATIVE, POSITIVE_INT, PROBABILITY, token_ids
from ..engine import generate, stream
from ..report import format_bytes
from ..tokenizer import tokenizer_for
from .common import UsageError, add_kv_quantization, add_model_args, kv_quantization, load_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text or token ids from a model")
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (encoded by the checkpoint's tokenizer.json; a random model: bytes)")
    prompt.add_argument("--prompt-ids", type=token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=POSITIVE_INT, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=PROBABILITY, help="sample among the likeliest tokens holding this probability "
                                                       "(default: all)")
    p.add_argument("--stop", type=NATURAL, action="append", default=[],
                   help="stop token id (repeatable; a trained tokenizer's end of text always stops)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=1024, help="prompt tokens per prefill call")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--compile", action="store_true",
                   help="decode with the step captured by torch.compile (same tokens; the first step compiles, and "
                        "is left out of the decode tok/s)")
    add_kv_quantization(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    if args.prompt_ids is not None:
        prompt, tokenizer = args.prompt_ids, None
    else:
        tokenizer = tokenizer_for(args.checkpoint, model.config.vocab_size)
        prompt = tokenizer.encode(args.prompt)
        if getattr(tokenizer, "eos_id", None) is not None:
            args.stop = args.stop + [tokenizer.eos_id]  # a trained model ends a document with <|endoftext|>
    if not prompt:
        raise UsageError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_tokens=args.stop, prefill_chunk=args.prefill_chunk, compile=args.compile,
                   kv_bits=kv_quantization(args))

    def show(tokens: list[int]) -> str:
        return tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))

    if args.stream:
        generation = stream(model, [prompt], args.max_new_tokens, **options)
        for step in generation:
            if step[0] is not None:
                print(show([step[0]]) if tokenizer else step[0], end="" if tokenizer else " ", flush=True)
        print()
        result = generation.result()
    else:
        result = generate(model, [prompt], args.max_new_tokens, **options)
        print(show(result.tokens[0]))
    name = model.config.arch if args.checkpoint else args.arch
    print(f"[{name}, {model.num_parameters() / 1e6:.2f}M params] prompt {len(prompt)} tokens, "
          f"{len(result.tokens[0])} new ({result.finish_reasons[0]}); prefill {result.prefill_s:.3f} s, "
          f"decode {result.decode_tok_s:.1f} tok/s; cache {format_bytes(result.cache_bytes)}", file=sys.stderr)
    return 0
