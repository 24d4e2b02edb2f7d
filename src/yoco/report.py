"""Reporting shared by the commands that print and write results: formatting, tables, files written
in one step (JSON, Markdown, figures)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def json_text(data, indent: int | None = 2) -> str:
    """Results as JSON: a figure that does not exist (NaN, an infinity) is null, never the ``NaN``
    token Python's json writes by default, which no JSON reader accepts."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file to ``path`` in one step: a reader (or a run that is
    interrupted) never sees half a file, only the previous one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(data, path: str | os.PathLike) -> None:
    """Results as a JSON file (``json_text``), written in one step."""
    text = json_text(data) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_markdown(text: str, path: str | os.PathLike) -> None:
    """A Markdown table (or any text) as a file, written in one step."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def format_bytes(n: float | None, digits: int = 2) -> str:
    """Bytes in binary units ("48.19 MiB"); "-" for a figure that does not exist."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


def times(ratio: float, above: str, below: str) -> str:
    """A ratio as people say it: "3.3x faster", and below 1 the opposite word with the ratio inverted
    ("0.3x faster" is read as slower by some and as faster by others)."""
    return f"{ratio:.1f}x {above}" if ratio >= 1 else f"{1 / ratio:.1f}x {below}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], file=None) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


# ---------------------------------------------------------------------- figures
def subplots(*args, **kwargs):
    """pyplot's ``subplots`` drawn by Agg: the figures go to files, no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def plain_tick_labels(fig) -> None:
    """Tick labels that read as they are, on every axis of `fig`: no offset or scientific multiplier
    beside an axis (such as "+4.274e2", which nobody adds back in their head to close losses). Log
    axes and labelled ticks have none anyway."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            formatter = axis.get_major_formatter()
            if isinstance(formatter, ScalarFormatter):
                formatter.set_useOffset(False)
                formatter.set_scientific(False)


def text_colour_on(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of this colour (by its WCAG relative
    luminance: at 0.179 both contrast alike)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def save_figure(fig, path) -> None:
    """Write `fig` as a PNG in one step (no reader sees half a file) and free it."""
    import matplotlib.pyplot as plt

    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
