"""ModelConfig / MoEConfig validation, presets, overrides and the generic YAML config helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from moeforge.config import ConfigError, apply_overrides, parse_override
from moeforge.model.config import ModelConfig, MoEConfig, list_presets, load_model_config

BASE = {"vocab_size": 128, "d_model": 64, "n_layers": 4, "n_heads": 4, "ffn_hidden": 128}
MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 32}


@pytest.fixture(autouse=True)
def _only_shipped_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEFORGE_CONFIGS", raising=False)


def _error(**fields: object) -> str:
    with pytest.raises(ValidationError) as info:
        ModelConfig(**{**BASE, **fields})
    return str(info.value)


def test_valid_base_config_builds_and_derives_head_dim_and_kv_heads() -> None:
    cfg = ModelConfig(**BASE, n_kv_heads=2, moe=MOE)
    assert cfg.head_dim == 16
    assert cfg.kv_heads == 2
    assert ModelConfig(**BASE).kv_heads == 4
    assert cfg.moe_layer_indices == [0, 1, 2, 3]


def test_n_heads_not_dividing_d_model_names_field_and_divisors() -> None:
    msg = _error(n_heads=5)
    assert "n_heads must divide d_model=64" in msg
    assert "got n_heads=5" in msg
    assert "allowed: [1, 2, 4, 8, 16, 32]" in msg


def test_every_n_heads_listed_as_allowed_is_accepted() -> None:
    msg = _error(n_heads=3)
    allowed = [int(v) for v in re.search(r"allowed: \[([^\]]*)\]", msg).group(1).split(",")]  # type: ignore[union-attr]
    rejected = []
    for n_heads in allowed:
        try:
            ModelConfig(**{**BASE, "n_heads": n_heads})
        except ValidationError:
            rejected.append(n_heads)
    assert rejected == []


def test_odd_head_dim_is_rejected_for_rope() -> None:
    assert "must be even for RoPE" in _error(d_model=60, n_heads=4)


def test_n_kv_heads_not_dividing_n_heads_names_field_and_divisors() -> None:
    msg = _error(n_kv_heads=3)
    assert "n_kv_heads must divide n_heads=4 (got 3)" in msg
    assert "allowed: [1, 2, 4]" in msg


def test_top_k_above_num_experts_names_both_fields() -> None:
    with pytest.raises(
        ValidationError, match=r"moe\.top_k must be between 1 and moe\.num_experts=4 \(got 5\)"
    ):
        MoEConfig(num_experts=4, top_k=5, expert_hidden=8)


def test_moe_layer_index_out_of_range_names_the_valid_range() -> None:
    msg = _error(moe={**MOE, "layers": [0, 4, -1]})
    assert "moe.layers must be layer indices in 0..3 (n_layers=4)" in msg
    assert "got [4, -1]" in msg


def test_duplicate_moe_layers_are_rejected() -> None:
    with pytest.raises(ValidationError, match=r"moe\.layers has duplicates"):
        MoEConfig(**MOE, layers=[1, 1])


def test_straight_through_requires_top_1() -> None:
    with pytest.raises(ValidationError, match=r"moe\.straight_through needs moe\.top_k == 1 \(got top_k=2\)"):
        MoEConfig(**MOE, straight_through=True)
    assert MoEConfig(**{**MOE, "top_k": 1}, straight_through=True).straight_through


def test_shared_experts_require_shared_expert_hidden() -> None:
    with pytest.raises(ValidationError, match=r"moe\.shared_expert_hidden must be set"):
        MoEConfig(**MOE, num_shared_experts=1)
    assert MoEConfig(**MOE, num_shared_experts=1, shared_expert_hidden=16).shared_expert_hidden == 16


@pytest.mark.parametrize(("where", "loc"), [("top", "bogus"), ("moe", "moe.bogus")])
def test_unknown_field_is_rejected_with_its_path(where: str, loc: str) -> None:
    overrides = ["bogus=1"] if where == "top" else ["moe.bogus=1"]
    with pytest.raises(ConfigError) as info:
        load_model_config("tiny", overrides)
    assert f"{loc}: Extra inputs are not permitted" in str(info.value)
    assert "tiny.yaml" in str(info.value)


def test_load_model_config_error_names_file_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_model_config("tiny", ["moe.top_k=9"])
    msg = str(info.value)
    assert "tiny.yaml: moe: moe.top_k must be between 1 and moe.num_experts=4 (got 9)" in msg


def test_every_shipped_preset_loads_and_validates() -> None:
    presets = list_presets()
    assert {"tiny", "dense-tiny", "small", "gpt2-moe", "ghost-32d", "oracle-850b", "oracle-mini"} <= set(
        presets
    )
    for name in presets:
        cfg = load_model_config(name)
        assert isinstance(cfg, ModelConfig)
        assert cfg.name == name


def test_preset_path_and_name_load_the_same_config() -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny.yaml"
    assert load_model_config(path) == load_model_config("tiny")


def test_unknown_preset_raises_config_error_listing_known_presets() -> None:
    with pytest.raises(ConfigError) as info:
        load_model_config("no-such-model")
    msg = str(info.value)
    assert "unknown model preset 'no-such-model'" in msg
    for name in list_presets():
        assert name in msg


def test_presets_in_moeforge_configs_dir_are_listed_and_take_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.yaml").write_text(
        "name: tiny\nvocab_size: 64\nd_model: 32\nn_layers: 1\nn_heads: 2\nffn_hidden: 8\n"
    )
    (models / "extra.yaml").write_text(
        "vocab_size: 64\nd_model: 32\nn_layers: 1\nn_heads: 2\nffn_hidden: 8\n"
    )
    monkeypatch.setenv("MOEFORGE_CONFIGS", str(tmp_path))
    assert "extra" in list_presets()
    assert load_model_config("tiny").vocab_size == 64
    assert load_model_config("extra").d_model == 32


def test_overrides_apply_to_nested_and_top_level_fields() -> None:
    cfg = load_model_config("tiny", ["moe.top_k=1", "d_model=64", "moe.capacity_factor=1.25"])
    assert cfg.d_model == 64
    assert cfg.head_dim == 16
    assert cfg.moe is not None
    assert cfg.moe.top_k == 1
    assert cfg.moe.capacity_factor == 1.25
    assert cfg.moe.num_experts == 4  # untouched fields keep the preset's value


def test_yaml_syntax_error_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\nvocab_size: 128\nd_model: [64, 128\nn_layers: 2\n")
    with pytest.raises(ConfigError) as info:
        load_model_config(bad)
    msg = str(info.value)
    assert re.search(rf"{re.escape(str(bad))}:[45]: not valid YAML", msg), msg


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_config(bad)


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_model_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("a.b=4", ["a", "b"], 4),
        ("x=[1,2]", ["x"], [1, 2]),
        ("lr=0.1", ["lr"], 0.1),
        ("flag=true", ["flag"], True),
        ("name=hello", ["name"], "hello"),
        ("name='4'", ["name"], "4"),
        ("a.b=", ["a", "b"], None),
        ("url=a=b", ["url"], "a=b"),
    ],
)
def test_parse_override_reads_value_as_yaml(text: str, path: list[str], value: object) -> None:
    got_path, got = parse_override(text)
    assert got_path == path
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("text", ["novalue", "=3", "a.b=[1,"])
def test_malformed_override_raises_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(text))):
        parse_override(text)


def test_apply_overrides_creates_sections_and_leaves_input_untouched() -> None:
    data = {"a": {"b": 1, "c": [1]}, "x": 0}
    out = apply_overrides(data, ["a.b=4", "x=[1,2]", "new.deep.key=true"])
    assert out == {"a": {"b": 4, "c": [1]}, "x": [1, 2], "new": {"deep": {"key": True}}}
    assert data == {"a": {"b": 1, "c": [1]}, "x": 0}
    out["a"]["c"].append(2)
    assert data["a"]["c"] == [1]  # deep copy, not aliasing


def test_apply_overrides_refuses_to_descend_into_a_value() -> None:
    with pytest.raises(ConfigError, match="'x' is a value, not a section"):
        apply_overrides({"x": 3}, ["x.y=1"])


def test_apply_overrides_later_override_wins() -> None:
    assert apply_overrides({}, ["a=1", "a=2"]) == {"a": 2}
