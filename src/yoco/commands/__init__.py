"""The ``yoco`` commands, one module each: its options (``add_parser``) beside the code that reads
them (``run``). ``common.py`` holds what several share; ``yoco.cli`` assembles them."""

from . import bench, bench_serve, compress_eval, convert, demo, generate, init, kv_table, serve, study, train
from . import eval as eval_command

# In the order `yoco --help` lists them.
COMMANDS = (demo, bench, bench_serve, kv_table, convert, train, eval_command, compress_eval, study, generate, serve, init)

__all__ = ["COMMANDS"]
