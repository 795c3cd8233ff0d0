"""The one progress bar of the CLI: a rich bar on stderr, and the callbacks the pipelines take.

Library functions report progress through plain callables (``progress(stage, done, total)`` and
``status(message)``); :func:`progress_bar` makes both for one bar and silences other writes to stderr
while it runs (libraries' own bars and warnings).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def _bar(err: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, transient=True)


@dataclass
class BarTask:
    """One task of a progress bar, with the callbacks the pipelines take."""

    bar: Any
    task: Any

    def update(self, **fields: Any) -> None:
        """Set any of ``description``, ``completed``, ``total``."""
        self.bar.update(self.task, **fields)

    def progress(self, stage: str, done: int, total: int) -> None:
        """``progress(stage, done, total)``: the stage's name and how far it is."""
        self.bar.update(self.task, description=stage[-60:], completed=done, total=total)

    def status(self, message: str) -> None:
        """``status(message)``: a one-line message in place of the description."""
        self.bar.update(self.task, description=message[-60:])


@contextlib.contextmanager
def progress_bar(err: Any, description: str) -> Iterator[BarTask]:
    """A transient progress bar on the console ``err`` with one task, stderr silenced meanwhile."""
    with _bar(err) as bar, contextlib.redirect_stderr(io.StringIO()):
        yield BarTask(bar, bar.add_task(description, total=None))
