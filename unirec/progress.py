"""Progress output that suits where it goes: a live tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns. On a terminal that is one line updated in place; in a captured
log (a file, a pipe, a CI console) every redraw stays, hundreds of fragments on a few physical lines, so
``tail`` shows a wall of bars instead of the last message. Outside a terminal :func:`progress_bar`
therefore returns :class:`PlainProgress`, which writes one complete line every ``every_s`` seconds and a
last one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, written as a plain line at most every ``every_s``.

    Args:
        total: steps in all.
        initial: steps already done (a resumed run).
        every_s: seconds between lines (0: a line at every update).
        stream: where the lines go.
        clock: seconds, monotonic (a fake one in tests).

    Example:
        >>> import io
        >>> ticks = iter(range(0, 100, 10))
        >>> out = io.StringIO()
        >>> bar = PlainProgress(5, 0, 15, out, clock=lambda: next(ticks))
        >>> for step in range(5):
        ...     bar.update()
        ...     bar.set_postfix(loss=f"0.{9 - step}")
        >>> bar.close()
        >>> print(out.getvalue(), end="")
        progress 2/5 (40%), 0.1 steps/s, 20 s elapsed, about 30 s left, loss=0.9
        progress 4/5 (80%), 0.1 steps/s, 40 s elapsed, about 10 s left, loss=0.7
        progress 5/5 (100%), 0.1 steps/s, 60 s elapsed, loss=0.5
    """

    def __init__(
        self,
        total: int,
        initial: int,
        every_s: float,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.n, self.every_s, self.stream, self.clock = total, initial, every_s, stream, clock
        self._initial = initial
        self._start = self._last = clock()
        self._postfix = ""
        self._written_at: Optional[int] = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._write(now)

    def set_postfix(self, **values: object) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """The last line, unless the last update already wrote one."""
        if self._written_at != self.n:
            self._write(self.clock())

    def _write(self, now: float) -> None:
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        todo = self.total - self.n
        left = f", about {todo / rate:.0f} s left" if rate > 0 and todo > 0 else ""
        pct = 100 * self.n / self.total if self.total else 100.0
        line = (
            f"progress {self.n}/{self.total} ({pct:.0f}%), {rate:.1f} steps/s, {elapsed:.0f} s elapsed{left}"
        )
        print(line + (f", {self._postfix}" if self._postfix else ""), file=self.stream, flush=True)
        self._last, self._written_at = now, self.n


class _Silent:
    """No output at all (progress switched off, or not the main rank)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int, initial: int = 0, enabled: bool = True, every_s: float = 30.0, stream: Optional[TextIO] = None
):
    """A tqdm bar when ``stream`` (default: stderr, where tqdm writes) is a terminal, else plain lines
    every ``every_s`` seconds (:class:`PlainProgress`); nothing when not ``enabled``.

    >>> import io
    >>> type(progress_bar(10, stream=io.StringIO())).__name__
    'PlainProgress'
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, file=stream)
    return PlainProgress(total, initial, every_s, stream)
