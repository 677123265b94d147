"""The one rendering path: rich consoles and progress bars."""

from __future__ import annotations

from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .errors import OptionTypeError

# Tables of layer names are wide; a pipe or a file gets room instead of rich's 80 columns.
_PIPE_WIDTH = 160


def require_stream(file: object, caller: str | None = None) -> None:
    """An error naming ``file`` (and ``caller``) unless it is None or has write(): rich would fail at the first print."""
    if file is not None and not callable(getattr(file, "write", None)):
        raise OptionTypeError(f"{caller + ': ' if caller else ''}file={file!r} must be a text stream with write() "
                              "(sys.stdout, open(path, 'w'), io.StringIO()), or None for the terminal")


def console(file: IO[str] | None = None, *, stderr: bool = False, quiet: bool = False) -> Console:
    require_stream(file)
    out = Console(file=file, stderr=stderr, quiet=quiet, highlight=False)
    if not out.is_terminal:
        out.width = max(out.width, _PIPE_WIDTH)
    return out


def progress(out: Console | None = None, *extra_columns) -> Progress:
    """A progress bar: description, bar, count, extra columns (e.g. a loss), elapsed and remaining time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=out or console(stderr=True),
        transient=False,
    )


def byte_progress(enabled: bool, total: int, description: str) -> Progress:
    """A progress bar of bytes written, with throughput, on stderr (a no-op unless ``enabled``)."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console(stderr=True), disable=not enabled, transient=False)
    bar.add_task(description, total=total)
    return bar
