"""One object decides how results reach the user: rich tables, JSON for machines, or nothing (--quiet)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:  # rich.progress is imported when a bar is drawn: start-up stays fast
    from rich.progress import Progress, TaskID
    from rich.table import Table


class Output:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    @property
    def human(self) -> bool:
        return not (self.json_mode or self.quiet)

    def json(self, data: Any) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(to_jsonable(data), indent=2, default=str, allow_nan=False) + "\n")

    def table(self, table: Table, *, wide: bool = False) -> None:
        """Print a table fitted to the terminal; `wide`: at its natural width, however wide the terminal is."""
        if not self.human:
            return
        if not wide:
            self.console.print(table)
            return
        from rich.measure import Measurement

        roomy = Console(width=100_000, highlight=False, file=self.console.file)
        natural = Measurement.get(roomy, roomy.options, table).maximum
        Console(width=max(natural, self.console.width), highlight=False, file=self.console.file).print(table)

    def line(self, text: str) -> None:
        if self.human:
            self.console.print(text)

    def warn(self, text: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {text}", soft_wrap=True)

    @contextmanager
    def progress(self, description: str) -> Iterator[ByteProgress]:
        """A byte progress bar with speed and ETA, drawn only for a person at a terminal."""
        if not self.human or not self.err.is_terminal:
            yield ByteProgress(None, None)
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class BinarySpeedColumn(ProgressColumn):
            """MiB/s (rich's TransferSpeedColumn counts MB/s; the summaries count MiB)."""

            def render(self, task: Any) -> Text:
                return Text("" if task.speed is None else f"{human_bytes(task.speed)}/s", style="progress.data.speed")

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),  # MiB, as the summaries count
            BinarySpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            yield ByteProgress(bar, bar.add_task(description, total=None))


class ByteProgress:
    """Callable with a byte count; the library calls it as work completes. Does nothing when there is no bar."""

    def __init__(self, bar: Progress | None, task: TaskID | None) -> None:
        self._bar, self._task = bar, task

    def set_total(self, total: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=total)

    def __call__(self, nbytes: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, nbytes)


def to_jsonable(data: Any) -> Any:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(data).items()}
    if isinstance(data, dict):
        return {str(k): to_jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [to_jsonable(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        # JSON has no Infinity or NaN (Python's json writes them, strict parsers refuse them): "inf", "-inf", "nan".
        return str(data)
    return data


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
