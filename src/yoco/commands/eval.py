"""``yoco eval``: validation loss, the passkey retrieval heatmap and MQAR of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import DEPTH, POSITIVE_INT, ListOf, TokenCount
from ..checkpoint import load_model, resolve_checkpoint
from ..data import SPECIAL_TOKENS, TokenShards
from ..report import format_bytes, print_table, write_json
from ..tasks import MQAR_PAIRS, MQAR_QUERIES, MQAR_SAMPLES, TaskError, mqar_batch
from ..tokenizer import tokenizer_for
from ..config import POSITION_FIELDS
from ..models import with_positions
from .common import (UsageError, add_dtype, add_kv_quantization, add_position_flags, add_seed, held_out_shards,
                     kv_quantization, position_changes)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="validation loss, passkey retrieval heatmap and MQAR of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a model folder, or a training run folder (its latest)")
    p.add_argument("--data", help="token shard folder (default: the run's data/ beside the checkpoint, or its "
                                  "study's a level up)")
    p.add_argument("--contexts", type=ListOf(TokenCount(1), "context lengths"), default="256,512,1024",
                   help="passkey context lengths, comma-separated")
    p.add_argument("--depths", type=ListOf(DEPTH, "depths"), default="0,0.25,0.5,0.75,1",
                   help="needle depths, comma-separated (0 = start, 1 = end)")
    p.add_argument("--trials", type=POSITIVE_INT, default=4, help="keys per (context, depth) cell")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=4096,
                   help="passkey prompt tokens per prefill call (long contexts: larger is faster, more memory)")
    add_position_flags(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="validation rows per batch")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per validation row")
    p.add_argument("--batches", type=POSITIVE_INT, default=16,
                   help="validation batches, from the start of the held-out split")
    p.add_argument("--mqar-samples", type=POSITIVE_INT, default=MQAR_SAMPLES, help="MQAR sequences")
    p.add_argument("--mqar-pairs", type=POSITIVE_INT, default=MQAR_PAIRS, help="key-value pairs per MQAR sequence")
    p.add_argument("--mqar-queries", type=POSITIVE_INT, default=MQAR_QUERIES, help="keys queried per MQAR sequence")
    add_kv_quantization(p)  # (the passkey's generation; the loss and MQAR are full forwards, with no cache)
    add_dtype(p)
    add_seed(p)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write the passkey heatmap PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import covered, extrapolating, mqar_accuracy, passkey_grid, plot_passkey, validation_loss

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a run folder: its latest checkpoint
    model = with_positions(load_model(args.checkpoint, dtype=args.dtype), position_changes(args))
    tokenizer = tokenizer_for(args.checkpoint, model.config.vocab_size)
    data = held_out_shards(args.checkpoint, args.data)
    val = TokenShards(data, "val")
    if len(val) < args.seq_len + 1:
        print(f"note: the validation split holds {len(val)} tokens, fewer than one row of {args.seq_len} + 1; "
              "scoring the training split instead")
        val = TokenShards(data, "train")
    quantization = kv_quantization(args)
    if quantization is not None:
        model.new_cache(1, capacity=2, kv_bits=quantization)  # a setting the model cannot use fails first
    report = {"checkpoint": str(args.checkpoint), "arch": model.config.arch,
              "kv_bits": 8 * next(model.parameters()).dtype.itemsize if quantization is None else quantization.bits}
    report.update(validation_loss(model, val, args.batch_size, args.seq_len, args.batches))
    if report["val_loss"] is None:  # even the training split (scored instead) holds no row
        raise UsageError(f"{covered(report)} of --seq-len + 1 = {args.seq_len + 1} at {str(data)!r}: pass a shorter "
                         "--seq-len")
    print(f"validation loss {report['val_loss']:.4f}, perplexity {report['perplexity']:.2f} over "
          f"{covered(report)} ({report['batches']} batches of {args.batch_size} x {args.seq_len})")
    haystack = val.tokens
    with extrapolating(model, max(args.contexts)) as limit:
        if limit is not None:
            print(f"note: contexts up to {max(args.contexts):,} tokens are beyond the model's max_seq_len={limit:,}: "
                  "evaluated as extrapolation (the limit is raised for this evaluation only)")
        if len(haystack) <= max(args.contexts):
            print(f"note: the held-out split holds {len(haystack):,} tokens; longer contexts repeat it end to end "
                  "(each cell's haystack_repeated says how often)")
        try:
            cells = passkey_grid(model, tokenizer, haystack, args.contexts, args.depths, args.trials, args.seed,
                                 prefill_chunk=args.prefill_chunk, kv_bits=quantization, progress=True)
        except TaskError as e:  # a context too short for the needle, a bad depth
            raise UsageError(f"passkey: {e}") from None
    report["passkey"] = cells
    report["positions"] = {name: getattr(model.config, name) for name in POSITION_FIELDS}
    print_table(["context", "depth", "accuracy", "time s", "peak RSS"],
                [[c["context"], f"{c['depth']:.0%}", f"{c['accuracy']:.0%}", f"{c['seconds']:.1f}",
                  format_bytes(c["peak_rss_bytes"])] for c in cells])
    # MQAR draws ids past the trained tokenizer's special tokens (<|endoftext|>, <|pad|>), as the study does
    ids, mask = mqar_batch(args.mqar_samples, args.mqar_pairs, args.mqar_queries,
                           range(len(SPECIAL_TOKENS), min(model.config.vocab_size, 4096)), seed=args.seed)
    report["mqar_accuracy"] = mqar_accuracy(model.eval(), ids, mask)
    print(f"MQAR ({args.mqar_pairs} pairs, {args.mqar_queries} queries): accuracy {report['mqar_accuracy']:.1%}")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        window = "" if model.config.window is None else f", window {model.config.window}"
        checkpoint = Path(args.checkpoint).resolve()
        plot_passkey(cells, Path(args.plot), f"passkey retrieval: {model.config.arch}{window}\n"
                                             f"{checkpoint.parent.name}/{checkpoint.name}")
        print(f"wrote {args.plot}")
    return 0
