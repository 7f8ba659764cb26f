"""One progress display for every long command: rich bars in a terminal, periodic log lines elsewhere.

In a terminal each task is a bar with done/total, the command's own fields (loss, tokens/s …), elapsed
time and ETA. When stderr is not a terminal (CI logs, ``nohup``, a pipe) a bar would print nothing
useful, so each task writes one plain line every ``every`` seconds and one when it finishes::

    train  120/600 (20%)  loss 3.1200 · 4.31K tok/s  elapsed 0:28  ETA 1:52
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Bars", "clock", "train_fields"]


def clock(seconds: float) -> str:
    """``95.2`` → ``1:35``; ``4000`` → ``1:06:40``."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate(per_s: float, unit: str) -> str:
    for suffix, scale in (("M", 1e6), ("K", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.2f}{suffix} {unit}/s"
    return f"{per_s:.0f} {unit}/s"


def train_fields(scalars: dict[str, float]) -> dict[str, str]:
    """The fields a training bar shows: loss and tokens/s."""
    out = {"loss": f"{scalars['loss']:.4f}"}
    if scalars.get("tokens_per_s"):
        out["_rate"] = rate(scalars["tokens_per_s"], "tok")
    return out


@dataclass
class _Line:
    label: str
    started: float
    last_print: float = 0.0
    done: int = 0
    total: int | None = None
    fields: dict[str, str] = field(default_factory=dict)


class Bars:
    """``with Bars(console) as bars: bars.update("map", "read tasks", done, total, loss="3.1")``.

    ``fields`` are shown after the count, in insertion order. ``transient`` bars disappear when the
    block ends (the command prints its own summary)."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        transient: bool = False,
        every: float = 10.0,
        interactive: bool | None = None,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self.every = every
        self._lines: dict[str, _Line] = {}
        self._ids: dict[str, Any] = {}
        self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress: Progress | None = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=transient,
            )

    def __enter__(self) -> Bars:
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
        elif exc_type is None:
            for line in self._lines.values():
                if line.last_print and (line.total is None or line.done < line.total):
                    self._print(line, time.monotonic())

    def print(self, message: str) -> None:
        """A message above the bars (or a plain line when not in a terminal); rich markup allowed."""
        (self._progress.console if self._progress is not None else self._err).print(message)

    def update(self, key: str, label: str, done: int, total: int | None, **fields: Any) -> None:
        now = time.monotonic()
        info = " · ".join(f"{v}" if k.startswith("_") else f"{k} {v}" for k, v in fields.items() if v != "")
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line(label, now)
        line.done, line.total, line.fields = done, total, {"info": info}
        if self._progress is not None:
            if key not in self._ids:
                self._ids[key] = self._progress.add_task(label, total=total, info=info)
            self._progress.update(self._ids[key], completed=done, total=total, info=info)
            return
        finished = total is not None and done >= total
        if finished or now - line.last_print >= self.every:
            self._print(line, now)

    def _print(self, line: _Line, now: float) -> None:
        line.last_print = now
        elapsed = now - line.started
        if line.total:
            count = f"{line.done}/{line.total} ({100 * line.done / line.total:.0f}%)"
            eta = (
                f"  ETA {clock(elapsed * (line.total - line.done) / line.done)}"
                if 0 < line.done < line.total
                else ""
            )
        else:
            count, eta = str(line.done), ""
        info = f"  {line.fields['info']}" if line.fields.get("info") else ""
        self._err.print(escape(f"{line.label}  {count}{info}  elapsed {clock(elapsed)}{eta}"))
        sys.stderr.flush()
