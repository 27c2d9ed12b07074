"""Progress of long stages: a bar on a terminal, a widget in a notebook, plain lines everywhere else.

A bar redrawn with carriage returns is unreadable in a log file, a CI job or a notebook's captured
output, so when stderr is not a terminal the same bar is written as a plain line now and then.
"""

from __future__ import annotations

import sys

LINE_SECONDS = 15.0  # at most one plain progress line this often


def display() -> str:
    """Where progress goes: "notebook" (a Jupyter kernel with ipywidgets), "terminal", or "lines"."""
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    if ipython is not None and hasattr(ipython, "kernel"):
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar is a widget)

            return "notebook"
        except ImportError:
            return "lines"
    return "terminal" if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else "lines"


class LineWriter:
    """A file for tqdm that turns each redraw into one line of its own on stderr (repeats skipped)."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, s: str) -> None:
        for piece in s.replace("\n", "\r").split("\r"):
            piece = piece.strip()
            if piece and piece != self.last:
                self.last = piece
                sys.stderr.write(piece + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(total: float | None = None, desc: str | None = None, unit: str = "it", enabled: bool = True, **kw):
    """A tqdm bar for a long stage, drawn where it can be read (see `display`); `enabled=False` shows nothing."""
    mode = display()
    if mode == "notebook":
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    if mode == "lines":
        kw = {"file": LineWriter(), "mininterval": LINE_SECONDS, "ncols": 100, **kw}
    elif mode == "terminal":
        kw = {"file": sys.stderr, "dynamic_ncols": True, **kw}
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, **kw)


def finish(bar) -> None:
    """Fill a bar whose units were estimates (characters for bytes, say) and close it."""
    if bar.total and bar.n < bar.total:
        bar.update(bar.total - bar.n)
    bar.close()


def clock(seconds: float) -> str:
    """1:23, 1:02:03."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


__all__ = ["LINE_SECONDS", "LineWriter", "clock", "display", "finish", "progress_bar"]
