"""Small helpers shared by CLI commands."""

from __future__ import annotations

import re
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

EXIT_GATES_FAILED = 1  # `data verify`, `data pairs …`: a gate failed

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, what: str = "value") -> float:
    """Parse ``5M``, ``850B``, ``1.2T``, ``3e6`` or ``1_000`` into a number; BadParameter otherwise."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise typer.BadParameter(
            f"{what} must be a number with an optional K/M/B/T suffix, like 5M or 850B (got {text!r})"
        )
    return float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()]


def human(n: float) -> str:
    """``850216559616`` → ``850.22B``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def gate_table(gates: list[dict[str, Any]]) -> Table:
    """The gates of a data run or a pair set (``gate``, ``verdict``, ``evidence``) as a table."""
    table = Table(title="gates")
    table.add_column("gate")
    table.add_column("verdict")
    table.add_column("evidence", overflow="fold")
    colours = {"pass": "green", "FAIL": "bold red", "skip": "yellow"}
    for g in gates:
        v = g["verdict"]
        table.add_row(g["gate"], f"[{colours[v]}]{v}[/]", escape(g["evidence"]))
    return table
