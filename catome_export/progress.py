"""Progress of long work on stderr, with an ETA: tqdm where it is installed, else one plain line per item.

``with Progress(total, "eval") as bar: ... bar.update(note="catome 3/8")``. The plain form prints
``eval: 3/16 (19%), 12.0 s elapsed, ETA 52 s; catome 3/8`` after each item, so a log file shows it too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, TextIO

logger = logging.getLogger(__name__)


def _eta(elapsed: float, done: int, total: int) -> str:
    if done <= 0 or total <= done:
        return "0 s" if total <= done else "?"
    remaining = elapsed / done * (total - done)
    return f"{remaining:.0f} s" if remaining < 120 else f"{remaining / 60:.1f} min"


class Progress:
    """Counts ``total`` items; see the module doc. ``use_tqdm=None``: tqdm when importable and ``stream`` is a
    terminal; plain lines otherwise."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, use_tqdm: bool | None = None,
                 emit: Callable[[str], None] | None = None) -> None:
        self.total = max(0, int(total))
        self.emit = emit
        """Where plain lines go instead of ``stream`` (e.g. a command's own progress callback; no tqdm then)."""
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._bar: Any = None
        if emit is not None:
            use_tqdm = False
        if use_tqdm is None:
            use_tqdm = bool(getattr(self.stream, "isatty", lambda: False)())
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
            except Exception:  # not installed, or broken: plain lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=label, file=self.stream, leave=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def line(self, note: str = "") -> str:
        """The plain progress line for the current count."""
        pct = 100 * self.done / self.total if self.total else 100.0
        text = (f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {self.elapsed:.1f} s elapsed, "
                f"ETA {_eta(self.elapsed, self.done, self.total)}")
        return f"{text}; {note}" if note else text

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        if self.emit is not None:
            self.emit(self.line(note))
        else:
            print(self.line(note), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
