"""``yoco kv-table``: the KV-cache bytes per token of every architecture, by formula and measured."""

from __future__ import annotations

import argparse

from ..arguments import TokenCount
from ..config import PRESETS
from ..report import format_bytes, print_table, times
from .common import add_archs, add_dtype


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kv-table", help="KV-cache bytes per token of every architecture: formula and measured")
    add_archs(p, ("every one",))
    p.add_argument("--preset", choices=["all"] + sorted(PRESETS), default="all", help="size preset")
    p.add_argument("--context", type=TokenCount(1), default=4096, help="context at which caches are measured")
    add_dtype(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import kv_table

    context = args.context
    presets = sorted(PRESETS) if args.preset == "all" else [args.preset]
    rows = [row for preset in presets for row in kv_table(preset, context, args.dtype, names=args.arch)]
    print(f"KV cache per sequence, {args.dtype}; measured = growth of a real cache from {context} positions "
          f"to twice that; constant = the part that does not grow")
    print_table(["arch", "preset", "params", "bytes/token (formula)", "bytes/token (measured)", "constant",
                 f"cache @ {context}", "vs transformer"],
                [[r["arch"], r["preset"], f"{r['params'] / 1e6:.2f}M", f"{r['formula_bytes_per_token']:,.0f}",
                  f"{r['measured_bytes_per_token']:,.0f}", format_bytes(r["constant_bytes"]),
                  format_bytes(r["cache_bytes_at_context"]),
                  "-" if r["vs_transformer"] is None else times(r["vs_transformer"], "smaller", "larger")]
                 for r in rows])
    return 0
