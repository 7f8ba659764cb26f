"""Expert collapse detection: patience, one event per episode, re-arming, stop action, resume."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from moeforge.train.collapse import CollapseConfig, CollapseDetector, CollapseEvent

SKEWED = {0: [0.9, 0.05, 0.05], 1: [0.4, 0.3, 0.3]}
BALANCED = {0: [0.34, 0.33, 0.33], 1: [0.4, 0.3, 0.3]}


def test_event_fires_after_patience_consecutive_checks_once_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = CollapseDetector(threshold=0.6, patience=3)
    with caplog.at_level(logging.WARNING, logger="moeforge.train.collapse"):
        assert d.check(10, SKEWED) == []
        assert d.check(20, SKEWED) == []
        (event,) = d.check(30, SKEWED)
        assert d.check(40, SKEWED) == []  # same episode: no second event
    assert event == CollapseEvent(layer=0, step=30, expert=0, fraction=0.9, consecutive=3)
    assert d.events == [event]
    assert "expert collapse in MoE layer 0 at step 30" in caplog.text
    assert not d.should_stop  # action "warn"


def test_a_recovered_layer_re_arms_and_a_broken_streak_starts_over() -> None:
    d = CollapseDetector(threshold=0.6, patience=2)
    d.check(1, SKEWED)
    d.check(2, BALANCED)  # streak broken before patience
    assert d.check(3, SKEWED) == []
    assert len(d.check(4, SKEWED)) == 1
    d.check(5, BALANCED)  # recovered: re-armed
    d.check(6, SKEWED)
    (again,) = d.check(7, SKEWED)
    assert (again.step, again.consecutive) == (7, 2)


def test_layers_missing_from_a_check_keep_their_streak() -> None:
    d = CollapseDetector(threshold=0.6, patience=2)
    d.check(1, SKEWED)
    d.check(2, {1: [0.4, 0.3, 0.3]})
    assert [e.layer for e in d.check(3, SKEWED)] == [0]


def test_stop_action_sets_should_stop_after_an_event() -> None:
    d = CollapseDetector(threshold=0.6, patience=1, action="stop")
    assert not d.should_stop
    d.check(1, SKEWED)
    assert d.should_stop


def test_state_round_trips_through_json_and_continues_identically() -> None:
    a = CollapseDetector(threshold=0.6, patience=3)
    a.check(1, SKEWED)
    a.check(2, SKEWED)
    b = CollapseDetector(threshold=0.6, patience=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.check(3, SKEWED) == b.check(3, SKEWED) != []
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        b.load_state_dict({"events": []})


def test_threshold_at_the_balanced_share_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    d = CollapseDetector(threshold=0.5)
    with caplog.at_level(logging.WARNING, logger="moeforge.train.collapse"):
        d.check(1, {0: [0.5, 0.5, 0.5, 0.5]})  # top-2 of 4 experts, perfectly balanced
    assert "balanced token share" in caplog.text


def test_config_validates_and_builds_a_detector() -> None:
    d = CollapseDetector.from_config(CollapseConfig(threshold=0.7, patience=5, action="stop"))
    assert (d.threshold, d.patience, d.action) == (0.7, 5, "stop")
    with pytest.raises(ValidationError):
        CollapseConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        CollapseConfig(action="halt")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        CollapseDetector(patience=0)
