"""Expert collapse detection: warn (or stop) when one expert takes most of a layer's tokens for a while.

A collapsed router sends nearly every token to the same expert; the other experts stop learning and the
MoE degenerates into a dense model with wasted parameters. One skewed logging interval is normal early
in training, so the detector only fires after ``patience`` consecutive checks above the threshold, once
per episode: it re-arms when the layer's largest share falls back to the threshold or below.

Input is :meth:`moeforge.train.metrics.RoutingAccumulator.load_fractions`: per layer, each expert's
share of tokens (shares sum to ``top_k``; balance is ``top_k / E``; 1.0 = every token). The threshold
must lie well above the balanced share — with 4 experts and top-2, balance is already 0.5.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field

from moeforge.config import StrictModel

__all__ = ["CollapseConfig", "CollapseDetector", "CollapseEvent"]

log = logging.getLogger(__name__)

CollapseAction = Literal["warn", "stop"]


class CollapseConfig(StrictModel):
    """Trainer settings for :class:`CollapseDetector`."""

    threshold: float = Field(
        default=0.60,
        gt=0.0,
        le=1.0,
        description="a layer is skewed when one expert's token share exceeds this (balance is top_k / E)",
    )
    patience: int = Field(default=3, ge=1, description="consecutive skewed checks before an event fires")
    action: CollapseAction = Field(
        default="warn", description="warn: log and continue; stop: the trainer stops after the event"
    )


@dataclass(frozen=True)
class CollapseEvent:
    """Layer ``layer`` had expert ``expert`` above the threshold for ``consecutive`` checks up to ``step``."""

    layer: int
    step: int
    expert: int
    fraction: float
    consecutive: int


class CollapseDetector:
    """Counts consecutive skewed checks per layer and emits one :class:`CollapseEvent` per episode.

    ``check`` is called at each logging interval with that interval's load fractions. ``should_stop`` is
    True once an event fired and ``action == "stop"``; the trainer checks it and ends the run (saving a
    checkpoint first is its choice). The state (counters, armed flags, events) round-trips through JSON
    via :meth:`state_dict` so a resumed run neither forgets a streak nor fires the same episode twice.
    """

    def __init__(self, threshold: float = 0.60, patience: int = 3, action: CollapseAction = "warn") -> None:
        cfg = CollapseConfig(threshold=threshold, patience=patience, action=action)  # validates
        self.threshold = cfg.threshold
        self.patience = cfg.patience
        self.action: CollapseAction = cfg.action
        self.events: list[CollapseEvent] = []
        self._consecutive: dict[int, int] = {}
        self._fired: set[int] = set()
        self._warned_balanced: set[int] = set()

    @classmethod
    def from_config(cls, cfg: CollapseConfig) -> CollapseDetector:
        return cls(cfg.threshold, cfg.patience, cfg.action)

    @property
    def should_stop(self) -> bool:
        return self.action == "stop" and bool(self.events)

    def check(self, step: int, load_fractions: dict[int, list[float]]) -> list[CollapseEvent]:
        """Update the streaks with one interval's fractions; returns the events that fired now.

        A layer missing from ``load_fractions`` (no tokens this interval) keeps its streak unchanged.
        """
        new: list[CollapseEvent] = []
        for layer, fractions in sorted(load_fractions.items()):
            if not fractions:
                continue
            balanced = sum(fractions) / len(fractions)  # a lower bound when dormant ghosts are listed
            if balanced >= self.threshold and layer not in self._warned_balanced:
                self._warned_balanced.add(layer)
                log.warning(
                    "collapse threshold %.2f is at or below layer %d's balanced token share %.2f "
                    "(top_k / experts): a balanced layer would count as collapsed; raise the threshold",
                    self.threshold,
                    layer,
                    balanced,
                )
            expert = max(range(len(fractions)), key=fractions.__getitem__)
            top = float(fractions[expert])
            if top <= self.threshold:
                self._consecutive[layer] = 0
                self._fired.discard(layer)  # recovered: a later episode may fire again
                continue
            count = self._consecutive.get(layer, 0) + 1
            self._consecutive[layer] = count
            if count >= self.patience and layer not in self._fired:
                self._fired.add(layer)
                event = CollapseEvent(layer=layer, step=step, expert=expert, fraction=top, consecutive=count)
                new.append(event)
                log.warning(
                    "expert collapse in MoE layer %d at step %d: expert %d took %.1f%% of tokens for %d "
                    "consecutive checks (threshold %.0f%%)%s",
                    layer,
                    step,
                    expert,
                    100 * top,
                    count,
                    100 * self.threshold,
                    "; stopping (collapse.action=stop)" if self.action == "stop" else "",
                )
        self.events.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (settings are not included: they come from the config)."""
        return {
            "consecutive": {str(k): v for k, v in sorted(self._consecutive.items())},
            "fired": sorted(self._fired),
            "events": [asdict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self._consecutive = {int(k): int(v) for k, v in state["consecutive"].items()}
            self._fired = {int(x) for x in state["fired"]}
            self.events = [CollapseEvent(**e) for e in state["events"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"collapse detector state is malformed ({exc!r}); expected the keys consecutive, fired, "
                f"events as written by state_dict(), got {sorted(state)}"
            ) from exc
