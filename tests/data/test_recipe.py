"""Recipes load strictly: unknown keys, ambiguous sources and bad ratios are errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeforge.config import ConfigError, apply_overrides, validate_config
from moeforge.data.recipe import Recipe, load_recipe, recipe_hash
from moeforge.data.vars import expand_vars

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"

BASE = {
    "name": "t",
    "sources": [
        {"name": "a", "path": "data/a.jsonl", "kind": "qa", "family": "fa", "domain": "math"},
        {
            "name": "b",
            "builtin": "word_problems",
            "count": 10,
            "kind": "qa",
            "family": "fb",
            "domain": "math",
        },
    ],
}


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def _with(**changes) -> dict:
    return {**BASE, **changes}


def _validate(data: dict) -> Recipe:
    return validate_config(Recipe, data, source="inline")


def test_load_recipe_reads_yaml_and_fills_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, BASE))
    assert isinstance(r, Recipe)
    assert [s.label for s in r.sources] == ["a", "b"]
    assert r.sources[0].path == "data/a.jsonl" and r.sources[1].builtin == "word_problems"
    assert (r.split.train, r.split.valid, r.split.test) == (0.90, 0.05, 0.05)
    assert r.dedup.policy == "keep_first" and r.families() == ["fa", "fb"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_with(bogus=1), "bogus"),
        (_with(split={"trian": 0.9}), "split.trian"),
        (_with(sources=[{**BASE["sources"][0], "famliy": "x"}]), "sources.0.famliy"),
    ],
)
def test_unknown_keys_are_rejected_naming_the_field(tmp_path, data, field):
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert f"{field}: Extra inputs are not permitted" in msg
    assert str(p) in msg


@pytest.mark.parametrize(
    ("inputs", "got"),
    [
        ({}, "none"),
        ({"path": "a.jsonl", "builtin": "stdlib"}, "['path', 'builtin']"),
        ({"path": "a.jsonl", "hf": {"path": "dir"}}, "['path', 'hf']"),
    ],
)
def test_a_source_needs_exactly_one_of_path_hf_builtin(inputs, got):
    src = {"kind": "text", "family": "f", "domain": "prose", **inputs}
    with pytest.raises(ConfigError, match="exactly one of path, hf or builtin") as exc:
        _validate({"name": "t", "sources": [src]})
    assert got in str(exc.value) and "sources.0" in str(exc.value)


def test_an_hf_source_needs_exactly_one_of_path_or_name():
    src = {"hf": {"path": "d", "name": "org/ds"}, "kind": "qa", "family": "f", "domain": "math"}
    with pytest.raises(ConfigError, match="exactly one of path"):
        _validate({"name": "t", "sources": [src]})


def test_expand_vars_uses_the_environment_then_the_default(monkeypatch):
    monkeypatch.setenv("MF_ROOT", "/data")
    monkeypatch.delenv("MF_UNSET", raising=False)
    assert expand_vars("${MF_ROOT}/x/${MF_UNSET:-dflt}/y") == "/data/x/dflt/y"
    assert expand_vars("${MF_ROOT:-ignored}") == "/data"
    assert expand_vars("${MF_UNSET:-}z") == "z"
    assert expand_vars("no vars, $MF_ROOT stays") == "no vars, $MF_ROOT stays"


def test_an_unset_variable_without_default_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("MF_MISSING_DIR", raising=False)
    with pytest.raises(ConfigError, match="MF_MISSING_DIR is not set"):
        expand_vars("${MF_MISSING_DIR}/train.jsonl")


def test_source_paths_are_expanded_when_the_recipe_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MF_ROOT", "/srv/data")
    monkeypatch.delenv("MF_MISSING_DIR", raising=False)
    src = {**BASE["sources"][0], "path": "${MF_ROOT}/a.jsonl"}
    assert load_recipe(_write(tmp_path, _with(sources=[src]))).sources[0].path == "/srv/data/a.jsonl"
    src = {**BASE["sources"][0], "path": "${MF_MISSING_DIR}/a.jsonl"}
    with pytest.raises(ConfigError, match=r"sources\.0\.path: .*MF_MISSING_DIR is not set"):
        load_recipe(_write(tmp_path, _with(sources=[src])))


@pytest.mark.parametrize("ratios", [(0.9, 0.05, 0.1), (0.8, 0.05, 0.05), (0.0, 0.0, 0.0)])
def test_split_ratios_must_sum_to_one(tmp_path, ratios):
    split = dict(zip(("train", "valid", "test"), ratios, strict=True))
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_recipe(_write(tmp_path, _with(split=split)))


def test_split_ratios_summing_to_one_with_float_error_are_accepted(tmp_path):
    r = load_recipe(_write(tmp_path, _with(split={"train": 0.7, "valid": 0.2, "test": 0.1})))
    assert r.split.valid == 0.2


def test_a_holdout_family_no_source_has_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"holdout_families names \['nope'\].*families: \['fa', 'fb'\]"):
        load_recipe(_write(tmp_path, _with(split={"holdout_families": ["nope"]})))
    r = load_recipe(_write(tmp_path, _with(split={"holdout_families": ["fb"]})))
    assert r.split.holdout_families == ["fb"]


def test_overrides_set_nested_values_and_list_items(tmp_path):
    r = load_recipe(
        _write(tmp_path, BASE),
        ["sources.0.path=other.jsonl", "sources.1.count=5", "dedup.policy=keep_longest", "seed=7"],
    )
    assert r.sources[0].path == "other.jsonl" and r.sources[1].count == 5
    assert r.dedup.policy == "keep_longest" and r.seed == 7


def test_overrides_do_not_modify_the_input():
    data = {"sources": [{"path": "a"}]}
    out = apply_overrides(data, ["sources.0.path=b", "split.seed=3"])
    assert out == {"sources": [{"path": "b"}], "split": {"seed": 3}}
    assert data == {"sources": [{"path": "a"}]}


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("sources.2.path=x", r"'2' is not an index of that list \(0\.\.1\)"),
        ("sources.first.path=x", "'first' is not an index of that list"),
        ("sources.-1.path=x", "'-1' is not an index of that list"),
        ("name.sub=x", "'name' is a value, not a section"),
        ("no_equals_sign", "must look like key.path=value"),
    ],
)
def test_bad_overrides_are_config_errors(tmp_path, override, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(_write(tmp_path, BASE), [override])


def test_an_override_that_fails_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"dedup\.policy"):
        load_recipe(_write(tmp_path, BASE), ["dedup.policy=keep_random"])


def test_recipe_hash_is_stable_across_loads_and_changes_with_any_setting(tmp_path):
    p = _write(tmp_path, BASE)
    h = recipe_hash(load_recipe(p))
    assert len(h) == 64 and h == recipe_hash(load_recipe(p))
    # the same settings written differently (defaults spelled out, keys reordered) hash the same
    explicit = {"split": {"test": 0.05, "valid": 0.05, "train": 0.9}, **BASE, "seed": 0}
    assert recipe_hash(load_recipe(_write(tmp_path, explicit))) == h
    for override in ("seed=1", "split.seed=1", "sources.1.count=11", "dedup.memory_mb=64"):
        assert recipe_hash(load_recipe(p, [override])) != h, override


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(tmp_path))
    r = load_recipe(path)
    assert r.name == path.stem
    paths = [s.path for s in r.sources if s.path is not None]
    assert all("${" not in p for p in paths)
    if "${MOEFORGE_REAL_DATA" in path.read_text(encoding="utf-8"):
        assert paths and all(p.startswith(f"{tmp_path}/") for p in paths)


def test_shipped_recipes_exist():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= {"demo", "gsm8k", "ru-en-prose", "code-stdlib"}


@pytest.mark.parametrize("bounds", [[0.6, 0.3], [0.2, 1.5]])
def test_language_share_bounds_are_validated_like_the_split_bounds(tmp_path, bounds):
    with pytest.raises(ConfigError, match=r"gates\.language_shares"):
        load_recipe(_write(tmp_path, _with(gates={"language_shares": {"ru": bounds}})))
