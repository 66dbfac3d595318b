"""The live progress line of a long write (convert, quantize, compile): what is being written,
how many of how many, megabytes written and their rate, time spent and time left.

A total is shown only where it is right: when the count runs past it (a writer that emits more
pieces than the model has tensors) the line drops the total rather than show "273/272".
"""
from __future__ import annotations

from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class _Count(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        done = int(task.completed)
        return Text(f"{done}/{int(task.total)} {self.unit}" if task.total is not None else f"{done} {self.unit}")


class _Bytes(ProgressColumn):
    """Megabytes written and MB/s over the run so far (no column when the writer reports none)."""

    def render(self, task) -> Text:
        written = task.fields.get("bytes", 0)
        if not written:
            return Text("")
        elapsed = task.elapsed or 0.0
        rate = f", {written / 1e6 / elapsed:.1f} MB/s" if elapsed > 0.2 else ""
        return Text(f"{written / 1e6:.1f} MB{rate}")


class _Left(TimeRemainingColumn):
    """Time left, once a total is known."""

    def render(self, task) -> Text:
        return super().render(task) if task.total is not None else Text("")


def write_progress(console, *, unit: str, disable: bool) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Count(unit), _Bytes(),
                    TimeElapsedColumn(), _Left(), console=console, transient=True, disable=disable)


def advance(prog: Progress, task, description: str, nbytes: int = 0) -> None:
    """One more piece written: its name, its bytes; the total goes once the count passes it."""
    t = next(x for x in prog.tasks if x.id == task)
    if t.total is not None and t.completed + 1 > t.total:
        t.total = None                  # update() reads None as "unchanged"
    prog.update(task, advance=1, description=description, bytes=t.fields.get("bytes", 0) + (nbytes or 0))
