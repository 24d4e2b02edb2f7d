"""The error of the compression package, below every module of it (stores and policies both raise it)."""

from ..errors import YocoError


class BudgetError(YocoError, ValueError):
    """A budget or policy setting that cannot work; the message names it."""
