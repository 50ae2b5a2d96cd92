"""Progress that a terminal and a log file both hold: a redrawn bar on a terminal, plain lines
(no carriage returns) when stderr is a file or a pipe, nothing with `--quiet`.

A plain line comes at most every `LINE_SECONDS` or every `LINE_SHARE` of a stage, with the
figures the bar shows (done / total, the postfix such as loss and rate, time spent and left), so
`tail`, CI logs and `nohup.out` stay readable and a long language run writes a few hundred lines,
not thousands of redraws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm import tqdm

LINE_SECONDS = 30.0
LINE_SHARE = 0.1
T = TypeVar("T")


class Settings:
    """`quiet`: the CLI's `--quiet` (only result lines)."""

    quiet = False


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineProgress(Generic[T]):
    """The part of tqdm's interface the project uses, written as plain lines on stderr."""

    def __init__(
        self, iterable: Iterable[T], desc: str, total: int | None, initial: int = 0
    ) -> None:
        self.iterable, self.desc, self.initial = iterable, desc, initial
        self.total = total if total is not None else _length(iterable)
        self.n, self.postfix = initial, ""
        self.started = self.last_time = time.monotonic()
        self.last_n = initial

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        share = LINE_SHARE * self.total if self.total else None
        due = now - self.last_time >= LINE_SECONDS or (share and self.n - self.last_n >= share)
        if due or (self.total and self.n == self.total):
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        done = self.n - self.initial
        if self.total:
            left = elapsed / done * (self.total - self.n) if done else 0.0
            where = f"{100 * self.n / self.total:.0f}% {self.n}/{self.total}"
            timing = f"{_clock(elapsed)} elapsed, {_clock(left)} left"
        else:
            where, timing = str(self.n), f"{_clock(elapsed)} elapsed"
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {where}{postfix}, {timing}", file=sys.stderr, flush=True)
        self.last_time, self.last_n = now, self.n

    def set_postfix(self, values: dict[str, Any], refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to erase: every line stays."""

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def progress(
    iterable: Iterable[T] | None = None,
    desc: str = "",
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
) -> Any:
    """A tqdm bar on a terminal, `LineProgress` otherwise, or the bare iterable (a silent
    counter without one) when disabled or quiet. Iterate it, or `update()` it by hand."""
    if disable or Settings.quiet:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(
            iterable,
            desc=desc,
            total=total,
            initial=initial,
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
        )
    return LineProgress(iterable if iterable is not None else (), desc, total, initial)


def report(text: str) -> None:
    """A line for the person running the command (an epoch's figures, a warning), printed
    above any bar; nothing with `--quiet`."""
    if not Settings.quiet:
        tqdm.write(text)
