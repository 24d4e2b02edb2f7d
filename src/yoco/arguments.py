"""The command line's argument types and parser: every option is checked where it is parsed, and a
bad value ends the command with exit status 2 and one line naming the option and the problem (no
usage dump, no traceback). Every option's help shows its default."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line: ``yoco train: error: argument --steps: must be a
    positive integer, got '0' (see yoco train --help)``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help states it itself, or there is none
    to show (a flag, a required option, or None: the help says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, argparse.SUPPRESS) \
                or action.default == []:
            return text
        return text + " (default: %(default)s)"


class Number:
    """An argparse type: an int or a float within bounds (``low``/``high``, excluded when ``open``)."""

    def __init__(self, kind: type, what: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False):
        self.kind, self.what = kind, what
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.__name__ = what  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r}") from None
        if self.kind is float and value != value:  # NaN passes every comparison below
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.what})"


POSITIVE_INT = Number(int, "a positive integer", low=1)
NATURAL = Number(int, "an integer >= 0", low=0)  # seeds, token ids, step counts that may be zero
POSITIVE = Number(float, "a positive number", low=0, low_open=True)
NON_NEGATIVE = Number(float, "a number >= 0", low=0)
SHARE = Number(float, "a share in [0, 1)", low=0, high=1, high_open=True)
PROBABILITY = Number(float, "a probability in (0, 1]", low=0, high=1, low_open=True)
DEPTH = Number(float, "a depth in [0, 1] (0 = the start, 1 = the end)", low=0, high=1)


class ListOf:
    """An argparse type: a comma (or space) separated list of ``item`` values, at least one."""

    def __init__(self, item: Callable[[str], object], what: str):
        self.item, self.what = item, what
        self.__name__ = f"list of {what}"

    def __call__(self, text: str) -> list:
        parts = [p for p in text.replace(",", " ").split() if p]
        if not parts:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {self.what}, got {text!r}")
        values = []
        for part in parts:
            try:
                values.append(self.item(part))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{part!r}: {e}") from None
        return values

    def __repr__(self) -> str:
        return f"ListOf({self.what})"


class TokenCount:
    """An argparse type: a token count with an optional K/M suffix (powers of two: 32K, 1M), at least
    ``minimum``."""

    def __init__(self, minimum: int = 1):
        self.minimum = minimum
        self.__name__ = "token count"

    def __call__(self, text: str) -> int:
        text = text.strip()
        scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
        digits = text[:-1] if scale > 1 else text
        try:
            value = int(digits) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 4096, 32K or 1M)") from None
        if value < self.minimum:
            raise argparse.ArgumentTypeError(f"must be a token count >= {self.minimum}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"TokenCount(>= {self.minimum})"


def token_count_text(n: int) -> str:
    """A token count as ``TokenCount`` reads it: 1024 -> "1K", 1 << 20 -> "1M", 3000 -> "3000"."""
    for suffix, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def names(known: Sequence[str], what: str = "architecture") -> ListOf:
    """An argparse type for ``--arch a,b``: known names only (use with ``action="extend"`` so that
    the option may also be repeated: ``--arch a --arch b``)."""

    def name(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {what}; choose from {', '.join(known)}")
        return text

    return ListOf(name, f"{what}s")


def budget(text: str) -> float | int | None:
    """A compression budget (``compress.policies.parse_budget``): a ratio in (0, 1], a token count >= 1,
    or ``none``."""
    from .compress.policies import BudgetError, parse_budget

    try:
        return parse_budget(text)
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kv_bit_width(text: str) -> int:
    """A K/V cache bit width: 8, 4 or 2 (quantized), or 32 / 16 (unquantized, in the model's dtype)."""
    if text.strip() not in ("32", "16", "8", "4", "2"):
        raise argparse.ArgumentTypeError(f"a K/V bit width is one of 32, 16, 8, 4, 2, got {text!r}")
    return int(text)


def quantized_bit_width(text: str) -> int:
    """A quantized K/V cache's bit width: 8, 4 or 2."""
    if text.strip() not in ("8", "4", "2"):
        raise argparse.ArgumentTypeError(f"must be 8, 4 or 2 bits, got {text!r}")
    return int(text)


def token_ids(text: str) -> list[int]:
    """Prompt token ids: integers >= 0 separated by commas or spaces."""
    return ListOf(Number(int, "a token id (an integer >= 0)", low=0), "token ids")(text)


__all__ = ["DEPTH", "HelpFormatter", "ListOf", "NATURAL", "NON_NEGATIVE", "Number", "POSITIVE", "POSITIVE_INT",
           "PROBABILITY", "Parser", "SHARE", "TokenCount", "budget", "names", "token_count_text", "token_ids"]
