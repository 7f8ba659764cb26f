"""Two fixes to how typer 0.29 renders ``--help`` (applied once, when the CLI is imported).

* Boolean flags are shown with a ``<bool>`` type column (``--resume <bool>``), which reads as if the
  flag took a value; flags get no type column, as in click's own help.
* A docstring's later paragraphs keep their source line breaks, so rich wraps each source line on
  its own and sentences break mid-phrase; single line breaks are joined into one flowing paragraph,
  except lines that start a list item or are indented (kept as written).
"""

from __future__ import annotations

import re
from typing import Any

from typer import core, rich_utils

_KEEP_BREAK = re.compile(r"^(\s|[-*•]\s|\d+[.)]\s|\$ |moeforge |torchrun )")  # indented, list, command


def _join_lines(paragraph: str) -> str:
    lines = paragraph.split("\n")
    if lines and lines[0].startswith("\b"):
        return paragraph
    out: list[str] = []
    for line in lines:
        if out and line.strip() and out[-1].strip() and not _KEEP_BREAK.match(line):
            out[-1] = f"{out[-1].rstrip()} {line.strip()}"
        else:
            out.append(line)
    return "\n".join(out)


def _fix_linebreaks(paragraphs: list[str], markup_mode: Any) -> str:
    return "\n\n".join(_join_lines(p) for p in paragraphs)


_display_type_rich = core.TyperOption.display_type_rich


def _option_type(self: core.TyperOption, ctx: Any) -> str | None:
    if self.is_flag and self.metavar is None:
        return None
    return _display_type_rich(self, ctx)


def tidy_help() -> None:
    rich_utils._fix_linebreaks = _fix_linebreaks  # type: ignore[assignment]
    core.TyperOption.display_type_rich = _option_type  # type: ignore[method-assign]
