"""Progress reporting: a rich progress bar on a terminal, plain periodic lines elsewhere.

Library functions take a :class:`Reporter` (default: silent) and call
``reporter.task(description, total)``; the CLI passes one that draws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int) -> Iterator[Task]: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass


class SilentReporter:
    """Reports nothing (the default for library calls and tests)."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


def _fmt(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class _PlainTask:
    def __init__(self, description: str, total: int, every: float, stream):
        self.description, self.total, self.every, self.stream = description, total, every, stream
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.first: tuple[float, int] | None = None  # (time, done) of the first advance

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(f"[{self.description}] {self.done}/{self.total} elapsed {now - self.start:.0f}s eta {self.eta(now)} {_fmt(fields)}".rstrip(),
                  file=self.stream, flush=True)

    def eta(self, now: float) -> str:
        """Time left at the rate since the first advance: a task may wait a long time
        before its first unit (cells wait for their models), which says nothing of its rate."""
        if self.done >= self.total:
            return "0s"
        t1, d1 = self.first
        if self.done == d1 or now <= t1:
            return "?"
        return f"{(now - t1) / (self.done - d1) * (self.total - self.done):.0f}s"


class ConsoleReporter:
    """Rich progress bars when ``stream`` is a terminal, else a line every ``every`` seconds.

    Concurrent tasks (e.g. models trained and cells evaluated by a sweep) share one rich
    display, one bar each.
    """

    def __init__(self, stream=None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.every = every
        self.is_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._progress = None
        self._open = 0

    def _display(self):
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = (TextColumn("{task.description:>8s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._progress = Progress(*columns, console=Console(file=self.stream))
            self._progress.start()
        return self._progress

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        if not self.is_terminal:
            yield _PlainTask(description, total, self.every, self.stream)
            return
        progress = self._display()
        tid = progress.add_task(description, total=total, info="")
        self._open += 1

        class _RichTask:
            def advance(self, n: int = 1, **fields: object) -> None:
                progress.update(tid, advance=n, **({"info": _fmt(fields)} if fields else {}))

        try:
            yield _RichTask()
        finally:
            self._open -= 1
            if self._open == 0:
                progress.stop()
                self._progress = None

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)
