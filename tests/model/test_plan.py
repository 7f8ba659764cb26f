"""The training plan (`moeforge model plan`): layouts, memory, communication formulas, and docs/SCALING.md
being exactly the command's output."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeforge.cli.main import app
from moeforge.model.config import ModelConfig, MoEConfig, load_model_config
from moeforge.model.plan import Assumptions, Layout, candidate_layouts, evaluate, plan
from moeforge.model.sizing import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="plan-tiny",
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=16,
        dtype="bfloat16",
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
    )


@pytest.fixture(scope="module")
def oracle() -> ModelConfig:
    return load_model_config("oracle-850b")


def test_scaling_doc_is_the_output_of_the_make_target() -> None:
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if "model plan" in ln)
    args = shlex.split(line.split("moeforge", 1)[1])
    assert args[-2:] == ["--out", "docs/SCALING.md"], line
    result = runner.invoke(app, args[:-2])
    assert result.exit_code == 0, result.output
    doc = (ROOT / "docs" / "SCALING.md").read_text(encoding="utf-8")
    assert result.stdout == doc, "docs/SCALING.md is stale: run `make scaling`"


@pytest.mark.parametrize("gpus", [1024, 2048, 4096])
def test_chosen_layout_uses_every_gpu_and_fits(oracle: ModelConfig, gpus: int) -> None:
    p = plan(oracle, gpus)
    lay = p.layout
    assert lay.tp * lay.ep * lay.pp * lay.dp == gpus == p.gpus
    assert lay.tp <= 8 and oracle.n_heads % lay.tp == 0 and oracle.kv_heads % lay.tp == 0
    assert oracle.moe is not None and oracle.moe.num_experts % lay.ep == 0
    assert oracle.n_layers % lay.pp == 0
    m = p.memory
    assert m.total == pytest.approx(m.weights + m.grads + m.optimizer + m.activations)
    assert m.total <= m.budget <= 80e9
    assert p.fits
    for alt in p.alternatives:  # the runners-up fit too, and are no faster
        assert alt.fits and alt.step_seconds >= p.step_seconds


def test_every_candidate_layout_multiplies_to_the_gpu_count(oracle: ModelConfig) -> None:
    layouts = candidate_layouts(oracle, 2048, Assumptions())
    assert layouts
    assert all(lay.gpus == 2048 for lay in layouts)


def test_oracle_on_one_gpu_is_a_clear_error(oracle: ModelConfig) -> None:
    with pytest.raises(ValueError, match=r"oracle-850b does not fit on 1 GPU: .* GB per GPU .*use more GPUs"):
        plan(oracle, 1)


def test_all_to_all_volume_matches_the_formula_by_hand() -> None:
    cfg = _tiny()
    a = Assumptions(global_batch_tokens=128)  # 8 sequences of 16 tokens
    p = evaluate(cfg, Layout(tp=1, ep=2, pp=1, dp=1, recompute="selective"), a)
    assert p.sequences == 8 and p.batch_tokens == 128 and p.microbatches == 4
    # 64 tokens per GPU × top-2 × d 64 × 2 bytes × 2 (dispatch+combine) × 2 (fwd+bwd) × 2 MoE layers
    assert p.comms.a2a_bytes == 64 * 2 * 64 * 2 * 2 * 2 * 2 == 131072
    # both EP ranks in one node: half the bytes stay on the GPU, the other half cross NVLink
    assert p.comms.a2a_links == "NVLink"
    assert p.comms.a2a_seconds == pytest.approx(65536 / (450e9 * 0.8))
    # one GPU per node: the remote half crosses the 400 Gb/s NICs instead
    q = evaluate(cfg, Layout(1, 2, 1, 1, "selective"), Assumptions(global_batch_tokens=128, gpus_per_node=1))
    assert q.comms.a2a_bytes == 131072
    assert q.comms.a2a_seconds == pytest.approx(65536 / (400e9 / 8 * 0.8))
    # full recompute repeats the forward all-to-all
    r = evaluate(cfg, Layout(1, 2, 1, 1, "full"), a)
    assert r.comms.a2a_bytes == 131072 * 3 // 2


def test_compute_bubble_and_step_time_follow_the_stated_formulas() -> None:
    cfg = _tiny()
    a = Assumptions(global_batch_tokens=128, mfu=0.5)
    p = evaluate(cfg, Layout(tp=1, ep=1, pp=2, dp=2, recompute="selective"), a)
    assert p.microbatches == 4
    assert p.bubble == pytest.approx(1 / 5)
    flops = flops_per_token(cfg, 16)["training"]
    assert p.compute_seconds == pytest.approx(flops * 128 / (4 * 989e12 * 0.5))
    c = p.comms
    work = p.compute_seconds + c.tp_exposed + c.a2a_exposed + c.pp_seconds
    assert p.step_seconds == pytest.approx(work * 5 / 4 + c.dp_exposed)
    assert p.tokens_per_second == pytest.approx(128 / p.step_seconds)
    assert p.days == pytest.approx(1e12 / p.tokens_per_second / 86400)


def test_days_fall_roughly_as_one_over_gpus(oracle: ModelConfig) -> None:
    days = {n: plan(oracle, n).days for n in (1024, 2048, 4096)}
    assert days[1024] > days[2048] > days[4096]
    assert 1.5 <= days[1024] / days[2048] <= 2.5
    assert 1.5 <= days[2048] / days[4096] <= 2.5


def test_plan_json_parses_and_reports_the_assumptions() -> None:
    result = runner.invoke(app, ["model", "plan", "oracle-850b", "--gpus", "2048", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    lay = data["layout"]
    assert lay["tp"] * lay["ep"] * lay["pp"] * lay["dp"] == lay["gpus"] == 2048
    assert data["assumptions"]["mfu"] == 0.4 and data["assumptions"]["nic_gbits"] == 400.0
    assert data["memory"]["total"] <= data["memory"]["budget"]
    several = runner.invoke(
        app,
        ["model", "plan", "tiny", "--gpus", "1", "--gpus", "2", "--json", "--mfu", "0.5", "--tokens", "1B"],
    )
    assert several.exit_code == 0, several.output
    plans = json.loads(several.stdout)
    assert [p["gpus"] for p in plans] == [1, 2]
    assert plans[0]["assumptions"]["train_tokens"] == 1e9


def test_plan_tables_name_the_layout_and_the_assumptions() -> None:
    result = runner.invoke(app, ["model", "plan", "oracle-850b", "--gpus", "4096"])
    assert result.exit_code == 0, result.output
    assert re.search(r"TP\d+ × EP\d+ × PP\d+ × DP\d+", result.stdout)
    for word in ("memory per GPU", "expert all-to-all", "days for", "link_efficiency", "dp_overlap"):
        assert word in result.stdout


def _run_main(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moeforge", *args], capture_output=True, text=True)


def test_cli_errors_exit_2_with_a_message() -> None:
    out = _run_main(["model", "plan", "no-such-model", "--gpus", "8"])
    assert out.returncode == 2
    assert "unknown model preset 'no-such-model'" in out.stderr and "Traceback" not in out.stderr
    out = _run_main(["model", "plan", "oracle-850b", "--gpus", "1"])
    assert out.returncode == 2
    assert "does not fit on 1 GPU" in out.stderr and "Traceback" not in out.stderr
