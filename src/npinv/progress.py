"""Progress display: a tqdm bar on a terminal; rare plain lines where stderr is not one.

tqdm redraws its bar with carriage returns, which a CI log or ``2> log`` keeps, one line per
update. Where stderr is not a terminal, :class:`Progress` draws no bar and prints, at most every
:data:`PLAIN_INTERVAL` seconds (``NPINV_PROGRESS_INTERVAL`` overrides it), one plain line
``desc: 12/50 it, 31 s, about 98 s left``; a short run prints nothing. A disabled tqdm bar is still
created, so the web app's Gradio progress (which hooks tqdm) keeps tracking the steps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

PLAIN_INTERVAL = 30.0


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _interval() -> float:
    try:
        return float(os.environ.get("NPINV_PROGRESS_INTERVAL", PLAIN_INTERVAL))
    except ValueError:
        return PLAIN_INTERVAL


def note(line: str) -> None:
    """One line on stderr that does not tear a bar being drawn."""
    tqdm.write(line, file=sys.stderr)


class Progress:
    """Iterate over ``iterable`` (or call :meth:`update`) with a bar titled ``desc``; ``desc=None``
    or ``enabled=False`` shows nothing."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = False) -> None:
        enabled = enabled and desc is not None
        terminal = stderr_is_terminal()
        self._bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not (enabled and terminal))
        self._plain = enabled and not terminal
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self._start = self._last = time.monotonic()
        self._interval = _interval()

    def __iter__(self) -> Iterator[Any]:
        for item in self._bar:
            yield item
            self._advance(1)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._advance(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance(self, n: int) -> None:
        self.n += n
        if not self._plain:
            return
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        elapsed = now - self._start
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and self.n < self.total:
            left = f", about {elapsed / self.n * (self.total - self.n):.0f} s left"
        print(f"{self.desc}: {self.n}{of} {self.unit}, {elapsed:.0f} s{left}", file=sys.stderr, flush=True)
