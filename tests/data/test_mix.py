"""Mixing: target shares of train tokens per group, reached by seeded down-sampling or capped repetition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeforge.config import ConfigError, validate_config
from moeforge.data.mix import MixConfig, MixError, approx_tokens, plan_mixture
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.store import read_records


def _cfg(**kw: object) -> MixConfig:
    return MixConfig.model_validate({"enabled": True, **kw})


def _data(n_a: int, n_b: int, size: int = 10) -> tuple[list[str], np.ndarray, list[str]]:
    groups = ["a"] * n_a + ["b"] * n_b
    return groups, np.full(n_a + n_b, size), [f"id{i}" for i in range(n_a + n_b)]


def test_downsampling_reaches_the_target_share_exactly_to_one_record() -> None:
    groups, sizes, ids = _data(900, 100)
    plan = plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.6, "b": 0.4}))
    assert plan.achieved == {"a": 1500, "b": 1000}  # b is scarce: all of it; a cut to 60%
    assert plan.shares("achieved") == {"a": 0.6, "b": 0.4}
    assert plan.weights[900:].tolist() == [1] * 100
    assert int(plan.weights[:900].sum()) == 150


def test_the_choice_is_seeded_and_stable() -> None:
    groups, sizes, ids = _data(500, 100)
    a = plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.5, "b": 0.5}, seed=1)).weights
    b = plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.5, "b": 0.5}, seed=1)).weights
    c = plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.5, "b": 0.5}, seed=2)).weights
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the same record keeps its decision when other records are added after it
    more = plan_mixture(groups + ["a"] * 10, np.append(sizes, [10] * 10), ids + [f"x{i}" for i in range(10)],
                        _cfg(target={"a": 0.5, "b": 0.5}, seed=1)).weights  # fmt: skip
    assert int(more[500:600].sum()) == 100


def test_repetition_up_to_the_cap_records_weights_not_copies() -> None:
    groups, sizes, ids = _data(300, 100)
    plan = plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.5, "b": 0.5}, max_repeat=2.5))
    # b can supply 2.5 passes → budget 5000 tokens; a gives 2500 of its 3000, b repeats 2.5×
    assert plan.factors["b"] == pytest.approx(2.5)
    assert set(plan.weights[300:].tolist()) == {2, 3}
    assert int(plan.weights[300:].sum()) == 250
    assert plan.shares("achieved") == {"a": 0.5, "b": 0.5}


def test_unknown_group_and_missing_group_are_clear_errors() -> None:
    groups, sizes, ids = _data(10, 10)
    with pytest.raises(MixError, match=r"group\(s\) \['b'\] that mix.target does not name"):
        plan_mixture(groups, sizes, ids, _cfg(target={"a": 1.0}))
    with pytest.raises(MixError, match=r"no records of it"):
        plan_mixture(groups, sizes, ids, _cfg(target={"a": 0.5, "b": 0.3, "c": 0.2}))


def test_zero_share_drops_a_group_on_purpose() -> None:
    groups, sizes, ids = _data(10, 10)
    plan = plan_mixture(groups, sizes, ids, _cfg(target={"a": 1.0, "b": 0.0}))
    assert plan.weights[10:].sum() == 0 and plan.weights[:10].sum() == 10


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        validate_config(MixConfig, {"enabled": True, "target": {"a": 0.5, "b": 0.2}})
    with pytest.raises(ConfigError, match="target is empty"):
        validate_config(MixConfig, {"enabled": True})
    assert validate_config(MixConfig, {"target": {"a": 0.5}}).enabled is False  # off: not checked


def test_approx_tokens_rule() -> None:
    assert approx_tokens(["one two three"]) == 5  # ceil(3 * 4/3) + 1
    assert approx_tokens(["a", "b c"]) == 3 + 4  # (ceil(4/3) + 1) + (ceil(8/3) + 1)


def _run(tmp_path: Path, mix: dict) -> tuple[Recipe, dict]:
    src_a, src_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    src_a.write_text(
        "".join(json.dumps({"text": f"alpha document number {i} " * 3}) + "\n" for i in range(600))
    )
    src_b.write_text("".join(json.dumps({"text": f"beta text {i} " * 2}) + "\n" for i in range(200)))
    recipe = Recipe.model_validate(
        {
            "name": "mix",
            "sources": [
                {"path": str(src_a), "kind": "text", "family": "fa", "domain": "prose"},
                {"path": str(src_b), "kind": "text", "family": "fb", "domain": "code"},
            ],
            "langid": {"enabled": False},
            "filters": {"quality_domains": []},
            "split": {"min_eval_records": 3},
            "mix": mix,
            "gates": {"train_ratio": [0.5, 0.97], "eval_ratio": [0.01, 0.2]},
        }
    )
    result = run_pipeline(recipe, tmp_path / "run")
    return recipe, result.manifest


def test_pipeline_mixes_train_only_and_the_gate_checks_the_achieved_shares(tmp_path: Path) -> None:
    _, manifest = _run(tmp_path, {"enabled": True, "by": "family", "target": {"fa": 0.5, "fb": 0.5}})
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert gates["mixture"]["verdict"] == "pass", gates["mixture"]
    assert all(g["passed"] for g in manifest["gates"]), manifest["gates"]
    assert manifest["mixture"]["achieved"] == pytest.approx({"fa": 0.5, "fb": 0.5}, abs=0.01)
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert stages["mix"]["dropped"]["mix:downsampled"] > 0
    # eval splits keep every record of both families
    valid = {c["family"]: c["records"] for c in manifest["counts"] if c["split"] == "valid"}
    assert sum(valid.values()) == manifest["records"]["valid"] and set(valid) == {"fa", "fb"}
    for shard in manifest["outputs"]["train"]:
        for rec in read_records(tmp_path / "run" / shard["path"]):
            assert rec.meta.provenance.steps[-1] == "mix"


def test_tampered_mixture_fails_the_gate(tmp_path: Path) -> None:
    from moeforge.data.gates import run_gates

    recipe, manifest = _run(tmp_path, {"enabled": True, "by": "family", "target": {"fa": 0.5, "fb": 0.5}})
    skewed = recipe.model_copy(
        update={"mix": recipe.mix.model_copy(update={"target": {"fa": 0.8, "fb": 0.2}})}
    )
    gates = {g.gate: g for g in run_gates(tmp_path / "run", manifest, skewed)}
    assert not gates["mixture"].passed and "target 0.8" in gates["mixture"].evidence
