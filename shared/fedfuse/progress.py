"""Progress bars for long steps (rich), silent when disabled or in tests."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, description: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            kwargs = {"description": description} if description else {}
            self._progress.update(self._task, advance=advance, **kwargs)


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[_Bar]:
    """``with progress_bar(True, "fitting", total=10) as bar: ... bar.update()``."""
    if not enabled:
        yield _Bar(None, None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
