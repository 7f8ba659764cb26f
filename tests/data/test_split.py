"""Split assignment is a pure function of (unit, seed); eval splits are never silently empty or tiny."""

from __future__ import annotations

from collections import Counter

import pytest

from moeforge.data.recipe import SplitConfig
from moeforge.data.split import SPLITS, SplitError, assign_split, check_split_sizes

IDS = [f"sha256:{i:064x}" for i in range(20_000)]


def test_assign_split_is_deterministic_and_depends_on_the_seed():
    cfg0, cfg1 = SplitConfig(seed=0), SplitConfig(seed=1)
    first = [assign_split(u, cfg0) for u in IDS[:2000]]
    assert first == [assign_split(u, SplitConfig(seed=0)) for u in IDS[:2000]]
    other = [assign_split(u, cfg1) for u in IDS[:2000]]
    assert first != other
    assert set(first) == set(other) == set(SPLITS)


def test_the_same_unit_always_gets_the_same_split_in_any_order():
    cfg = SplitConfig()
    forward = {u: assign_split(u, cfg) for u in IDS[:3000]}
    backward = {u: assign_split(u, cfg) for u in reversed(IDS[:3000])}
    assert forward == backward


def test_a_held_out_record_always_goes_to_test():
    cfg = SplitConfig(train=1.0, valid=0.0, test=0.0)
    assert {assign_split(u, cfg, holdout=True) for u in IDS[:500]} == {"test"}
    assert {assign_split(u, cfg) for u in IDS[:500]} == {"train"}


def test_shares_over_20000_ids_are_within_one_percent_of_the_ratios():
    counts = Counter(assign_split(u, SplitConfig()) for u in IDS)
    shares = {s: counts[s] / len(IDS) for s in SPLITS}
    assert shares["train"] == pytest.approx(0.90, abs=0.01)
    assert shares["valid"] == pytest.approx(0.05, abs=0.01)
    assert shares["test"] == pytest.approx(0.05, abs=0.01)


def test_other_ratios_are_honoured_and_a_zero_ratio_split_gets_nothing():
    counts = Counter(assign_split(u, SplitConfig(train=0.6, valid=0.0, test=0.4)) for u in IDS[:5000])
    assert counts["valid"] == 0
    assert counts["train"] / 5000 == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("name", ["valid", "test"])
def test_a_tiny_eval_split_is_an_error_naming_the_split_and_the_fixes(name):
    cfg = SplitConfig(min_eval_records=10)
    counts = {"train": 900, "valid": 50, "test": 50, name: 3}
    with pytest.raises(SplitError) as exc:
        check_split_sizes(counts, 953, cfg)
    msg = str(exc.value)
    assert f"{name} would get 3 record(s)" in msg and "pool of 953" in msg
    assert "min_eval_records=10" in msg
    assert (
        f"raise split.{name}" in msg and f"split.{name}: 0" in msg and "lower split.min_eval_records" in msg
    )


def test_a_missing_eval_split_counts_as_zero():
    with pytest.raises(SplitError, match="valid would get 0 record"):
        check_split_sizes({"train": 100, "test": 20}, 120, SplitConfig(min_eval_records=5))


def test_exactly_the_minimum_is_enough():
    check_split_sizes({"train": 100, "valid": 5, "test": 5}, 110, SplitConfig(min_eval_records=5))


def test_a_zero_ratio_split_may_be_empty():
    cfg = SplitConfig(train=0.95, valid=0.0, test=0.05, min_eval_records=5)
    check_split_sizes({"train": 95, "valid": 0, "test": 5}, 100, cfg)
    check_split_sizes({"train": 95, "test": 5}, 100, cfg)


def test_an_empty_train_split_is_an_error():
    with pytest.raises(SplitError, match="train would be empty"):
        check_split_sizes({"train": 0, "valid": 20, "test": 20}, 40, SplitConfig(min_eval_records=5))
    # an all-eval recipe may have no train split on purpose
    cfg = SplitConfig(train=0.0, valid=0.5, test=0.5, min_eval_records=5)
    check_split_sizes({"train": 0, "valid": 20, "test": 20}, 40, cfg)
