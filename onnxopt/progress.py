"""Progress bars (rich) for work that takes more than a moment; nothing when stdout is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console


@contextlib.contextmanager
def bar(console: Console, description: str, total: float | None = None, *, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """Yield ``advance(steps=1, description=None)``; a no-op when quiet or not on a terminal."""
    if quiet or not console.is_terminal:
        yield lambda steps=1, description=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(steps: float = 1, description: str | None = None) -> None:
            progress.update(task, advance=steps, **({"description": description} if description else {}))

        yield advance
