"""Terminal output shared by every CLI verb: progress bars and summary tables (rich)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "items") -> Iterator:
    """A progress bar; yields ``advance(n=1)``. Drawn on stderr, silent when not a terminal."""
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=False, disable=not sys.stderr.isatty())
    with prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            prog.advance(task, n)

        advance.set_total = lambda n: prog.update(task, total=n)  # once it is known
        yield advance


@contextmanager
def training_progress(label: str) -> Iterator[Callable[[int, int, dict | None], None]]:
    """A training loop's ``progress(step, total, row)`` (ccrk.trainer.StepProgress): a bar with samples/s
    and the loss on a terminal (stderr), else a line per logged row on stdout."""
    tty = sys.stderr.isatty()
    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TextColumn("{task.fields[sps]:.1f} samples/s  loss {task.fields[loss]:.3f}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not tty)
    task = None

    def progress(step: int, total: int, row: dict | None = None) -> None:
        nonlocal task
        if task is None:
            task = prog.add_task(label, total=total, completed=step, sps=0.0, loss=float("nan"))
        fields = {"sps": row["samples_per_s"], "loss": row["loss"]} if row else {}
        prog.update(task, completed=step, **fields)
        if row and not tty:
            console.print(f"step {step}/{total} loss {row['loss']:.4f} ({row['samples_per_s']:.1f} samples/s)")

    with prog:
        yield progress


def track(items: Iterable, description: str, total: int | None = None, unit: str = "items") -> Iterator:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total, unit) as advance:
        for item in items:
            yield item
            advance()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(str(col))
    for row in rows:
        # Text(), not str: data such as "captions [en]" must not be read as rich markup.
        table.add_row(*[Text(_fmt(v)) for v in row])
    need = console.measure(table, options=console.options.update(max_width=1000)).maximum
    if console.is_terminal or need <= console.width:
        console.print(table)
        return
    # A file or a pipe (a log, CI) has no width to keep to: rich would squeeze the table into 80
    # columns and cut its cells to "…"; print it whole instead.
    width = console.width
    console.width = need
    try:
        console.print(table)
    finally:
        console.width = width


def print_mapping(title: str, mapping: dict) -> None:
    print_table(title, ["", "value"], [(k, v) for k, v in mapping.items()])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
