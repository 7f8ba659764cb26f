"""The metrics log: :class:`MetricsWriter` appends one JSON line per call to ``metrics.jsonl``, mirrored to
TensorBoard when installed.

Split out of :mod:`moeforge.train.metrics`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from moeforge.io import atomic_write_text

__all__ = ["MetricsWriter"]

# The logger name of the module this code was split out of, so log filters and levels keep working.
log = logging.getLogger("moeforge.train.metrics")


def _json_value(value: Any) -> Any:
    """JSON-safe scalar: tensors to Python numbers, NaN/±inf to None (JSON has no spelling for them)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric values must be scalars; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"metric values must be numbers, strings, bools or None; got {type(value).__name__}")


class MetricsWriter:
    """Appends ``{"step": ..., "split": ..., **values}`` lines to ``<path_dir>/metrics.jsonl``.

    One JSON object per line, flushed after every write so a killed run loses nothing it logged. NaN and
    ±inf are written as ``null`` (strict JSON has no NaN, and ``jq``/pandas choke on Python's ``NaN``),
    so a diverged loss shows up as a null, never as a broken file. Scalars also go to TensorBoard
    (``<path_dir>/tensorboard``, tags ``{split}/{name}``, raw values there) when ``tensorboard`` is True
    and the package is installed; otherwise that is skipped with one info line.

    On ranks other than 0 every method is a no-op, so the trainer can call it unconditionally.
    ``truncate_after_step`` (for a resumed run) first drops lines with a larger step — the steps that will
    be trained again — and a torn last line from a crash, so the log has each step once; lines of
    ``redo_splits`` at that step go too (the trainer evaluates the test split after its last checkpoint,
    so a run killed after that evaluation does it again). :meth:`last` then returns what the kept lines
    said last for a split (the trainer's last validation result, for the summary of a run resumed at its
    end).
    """

    def __init__(
        self,
        path_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        rank: int = 0,
        truncate_after_step: int | None = None,
        redo_splits: tuple[str, ...] = ("test",),
    ) -> None:
        self.path = Path(path_dir) / "metrics.jsonl"
        self.enabled = rank == 0
        self._fh: IO[str] | None = None
        self._tb: Any = None
        self._last: dict[str, dict[str, Any]] = {}
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            self._truncate(truncate_after_step, redo_splits)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; writing metrics to %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def _truncate(self, step: int, redo_splits: tuple[str, ...]) -> None:
        kept: list[str] = []
        dropped = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            at = int(obj.get("step", 0))
            if at < step or (at == step and obj.get("split") not in redo_splits):
                kept.append(line)
                self._last[str(obj.get("split"))] = {
                    k: v for k, v in obj.items() if k not in ("step", "split")
                }
            else:
                dropped += 1
        if dropped:
            log.info(
                "metrics: dropped %d line(s) after step %d from %s (resumed run)", dropped, step, self.path
            )
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def last(self, split: str) -> dict[str, Any]:
        """The values of the last line of ``split`` kept from before a resume (``{}`` when none)."""
        return dict(self._last.get(split, {}))

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Append one line; raises ValueError on a key that collides with ``step``/``split``."""
        if not self.enabled or self._fh is None:
            return
        clash = {"step", "split"} & set(values)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved; rename them")
        record: dict[str, Any] = {"step": int(step), "split": split}
        record.update((k, _json_value(v)) for k, v in values.items())
        self._fh.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, v in values.items():
                if isinstance(v, torch.Tensor):
                    v = v.item()
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{key}", v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
