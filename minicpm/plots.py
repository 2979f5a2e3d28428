"""How every report draws a PNG: a matplotlib figure apart from pyplot, saved atomically, log axes people can read.

A figure made here is drawn by the Agg canvas and never registered with pyplot: no global state, no backend to
choose, nothing to close, safe in any thread or forked worker. Its layout is matplotlib's constrained layout
(titles, colour bars and twin axes kept inside the canvas) and it is saved at its own dpi.
"""

from __future__ import annotations

import io
from pathlib import Path

from minicpm.files import write_atomic


def figure(width: float = 9.0, height: float = 5.2, *, dpi: int = 110):
    """A blank figure of width x height inches (the default: a `minicpm report` panel)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (for a page that embeds it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(fig, path: str | Path) -> Path:
    """The figure as a PNG at `path`, written atomically (no reader sees half an image)."""
    return write_atomic(path, png_bytes(fig))


def log_axis(ax, which: str = "x", ticks=None) -> None:
    """A log axis labelled as plain numbers, at `ticks` when given (e.g. the values a sweep tried), else at 1, 2
    and 5 times each power of ten: matplotlib's default labels some minor ticks in scientific notation, which run
    into each other on a narrow panel."""
    from matplotlib import ticker

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(ticker.FixedLocator(sorted(ticks)) if ticks is not None else
                           ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())
