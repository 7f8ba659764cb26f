"""The `moeforge` command: version, model info/list/mini/solve, and clean errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from moeforge import __version__
from moeforge.cli.main import app

runner = CliRunner()


def test_version_flag_prints_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"moeforge {__version__}"


def test_python_dash_m_moeforge_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "moeforge", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"moeforge {__version__}"


def test_model_info_json_reports_oracle_850b_within_the_claimed_sizes():
    result = runner.invoke(app, ["model", "info", "oracle-850b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"total_params", "active_params", "flops_per_token"} <= data.keys()
    assert abs(data["total_params"] / 850e9 - 1) <= 0.02
    assert 110e9 <= data["active_params"] <= 130e9
    assert data["memory"]["min_gpus_80gb"] >= 1


def test_model_info_applies_set_overrides():
    base = json.loads(runner.invoke(app, ["model", "info", "tiny", "--json"]).stdout)
    top1 = json.loads(runner.invoke(app, ["model", "info", "tiny", "--json", "--set", "moe.top_k=1"]).stdout)
    assert top1["total_params"] == base["total_params"]
    assert top1["active_params"] < base["active_params"]


def test_model_info_table_mentions_totals():
    result = runner.invoke(app, ["model", "info", "tiny"])
    assert result.exit_code == 0
    assert "active per token" in result.stdout


def test_model_list_shows_every_preset():
    result = runner.invoke(app, ["model", "list"])
    assert result.exit_code == 0
    for name in ("tiny", "small", "dense-tiny", "ghost-32d", "gpt2-moe", "oracle-850b", "oracle-mini"):
        assert name in result.stdout


def _run_main(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moeforge", *args], capture_output=True, text=True)


def test_unknown_preset_is_a_clean_error_without_traceback():
    out = _run_main(["model", "info", "no-such-model"])
    assert out.returncode == 2
    assert "unknown model preset 'no-such-model'" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_override_names_the_field():
    out = _run_main(["model", "info", "tiny", "--set", "n_heads=3"])
    assert out.returncode == 2
    assert "n_heads must divide d_model" in out.stderr
    assert "Traceback" not in out.stderr


def test_mini_writes_a_loadable_yaml_near_the_target(tmp_path):
    target = tmp_path / "mini.yaml"
    result = runner.invoke(
        app, ["model", "mini", "oracle-850b", "--params", "5M", "--vocab", "4096", "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["model", "info", str(target), "--json"]).stdout)
    assert 0.8 * 5e6 <= info["total_params"] <= 1.25 * 5e6
    cfg = yaml.safe_load(target.read_text())
    assert cfg["moe"]["num_experts"] == 64 and cfg["moe"]["top_k"] == 2


def test_mini_refuses_a_target_the_embeddings_alone_exceed():
    out = _run_main(["model", "mini", "oracle-850b", "--params", "5M"])
    assert out.returncode == 2
    assert "--vocab" in out.stderr


@pytest.mark.parametrize("bad", ["five", "5X", ""])
def test_bad_count_suffix_is_rejected(bad):
    result = runner.invoke(app, ["model", "mini", "tiny", "--params", bad])
    assert result.exit_code != 0
    assert "K/M/B/T" in result.output


def test_solve_proposes_dims_that_hit_the_targets(tmp_path):
    target = tmp_path / "solved.yaml"
    args = ["model", "solve", "--total", "850B", "--active", "120B", "--experts", "64", "--top-k", "2"]
    result = runner.invoke(app, [*args, "--out", str(target)])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["model", "info", str(target), "--json"]).stdout)
    assert abs(info["total_params"] / 850e9 - 1) < 0.02
    assert abs(info["active_params"] / 120e9 - 1) < 0.02


def test_solve_rejects_active_larger_than_total():
    out = _run_main(["model", "solve", "--total", "10B", "--active", "20B", "--experts", "8", "--top-k", "2"])
    assert out.returncode == 2
    assert "active" in out.stderr


def test_help_shows_flags_without_a_type_and_joins_wrapped_sentences() -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "train", "run", "--help"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "100"},
        timeout=60,
    )
    assert r.returncode == 0
    assert "<bool>" not in r.stdout
    assert "--resume " in r.stdout
    # the docstring's two source lines flow into one paragraph instead of breaking after "Ctrl-C writes a"
    assert "Ctrl-C writes a checkpoint and stops" in " ".join(r.stdout.split())
    text = r.stdout.splitlines()
    assert not any(line.strip().endswith("Ctrl-C writes a") for line in text)
