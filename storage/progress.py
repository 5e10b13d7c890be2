"""Progress as a parameter: the library and the flows report progress through a ``Progress`` the caller
passes in, never through a module global or the app's console.

A ``Progress`` is called as ``progress(description, total, unit)`` and returns a context manager that
yields ``advance(n=1)``. The command line passes ``ccrk.app.console.progress_bar`` (a rich bar on
stderr); everything else gets :func:`no_progress`, which counts nothing and draws nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

Advance = Callable[..., None]
Progress = Callable[[str, "int | None", str], ContextManager[Advance]]


@contextmanager
def no_progress(description: str = "", total: int | None = None, unit: str = "items") -> Iterator[Advance]:
    """The silent default: yields an ``advance`` that does nothing."""

    def advance(n: int = 1) -> None:
        return None

    advance.set_total = lambda n: None
    yield advance


def or_silent(progress: Progress | None) -> Progress:
    """``progress`` itself, or :func:`no_progress` when none was given."""
    return progress or no_progress
