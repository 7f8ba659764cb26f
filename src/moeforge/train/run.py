"""Entry point shared by ``moeforge train`` and ``torchrun -m moeforge.train``: config → Trainer → result."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

from moeforge.train.config import load_train_config
from moeforge.train.distributed import init_distributed, shutdown
from moeforge.train.trainer import ProgressFn, Trainer, TrainResult

__all__ = ["run_training"]

log = logging.getLogger(__name__)


def run_training(
    config: str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train from a config file. SIGINT/SIGTERM finish the current step, write a checkpoint and stop
    (``status: stopped``), so ``--resume`` continues exactly there."""
    cfg = load_train_config(config, overrides)
    info = init_distributed(cfg.device)
    stop = {"asked": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log.warning("signal %d: stopping after this step and writing a checkpoint (again to abort)", signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer = Trainer.from_config(cfg, info, resume=resume, overwrite=overwrite)
        try:
            return trainer.run(progress=progress if info.is_main else None, should_stop=lambda: stop["asked"])
        finally:
            trainer.close()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        shutdown()
