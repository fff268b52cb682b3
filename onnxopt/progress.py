"""Progress bars (rich) for work that takes more than a moment; nothing when stdout is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console


@contextlib.contextmanager
def bar(
    console: Console, description: str, total: float | None = None, *, quiet: bool = False
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(steps=1, description=None, total=None)``; a new ``total`` starts the count again.

    Nothing is shown when quiet or not on a terminal."""
    if quiet or not console.is_terminal:
        yield lambda steps=1, description=None, total=None: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(
            steps: float = 1, description: str | None = None, total: float | None = None
        ) -> None:
            if total is not None:
                progress.reset(task, total=total)
            progress.update(
                task, advance=steps, **({"description": description} if description else {})
            )

        yield advance
