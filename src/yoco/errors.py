"""The one base of yoco's errors.

Every error yoco raises on bad input or a bad file derives from ``YocoError`` (besides the builtin
it always was: ``ConfigError`` is still a ``ValueError``, ``CheckpointError`` a ``RuntimeError``), so
that a caller -- the ``yoco`` command first -- catches them all with one clause, and a bug (any other
exception) still surfaces with its traceback."""


class YocoError(Exception):
    """An error whose message names the problem for the user; the command line prints it on one line
    and exits with status 2."""


__all__ = ["YocoError"]
