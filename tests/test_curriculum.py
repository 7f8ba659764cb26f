"""`moeforge curriculum run`: a shortened configs/curriculum/demo.yaml — data and tokenizer, pretrain → SFT →
identity pairs from the SFT model → DPO — with a crash in the SFT stage; the rerun skips the finished
pretrain stage, resumes SFT from its checkpoint and finishes the plan; the state, report and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeforge.curriculum import CurriculumError, run_curriculum

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _plan(tmp_path: Path) -> Path:
    plan = yaml.safe_load((CONFIGS / "curriculum" / "demo.yaml").read_text())
    plan["data"]["recipe"] = str(CONFIGS / "data" / "demo.yaml")
    plan["data"]["tokenizer_vocab"] = 512
    # short: a few steps, a given peak (no FLOP/s probe in the test's empty cache), no test-split pass, a slice
    # of the records
    short = [
        "eval.max_batches=2",
        "eval.test_at_end=false",
        "log_every=2",
        "optim.warmup_steps=1",
        "peak_flops=1.0e11",
    ]
    for stage in plan["stages"]:
        stage["train"] = str(CONFIGS / "train" / Path(stage["train"]).name)
        stage["set"] += short
    plan["stages"][0]["set"] += ["steps=6", "eval.every=6", "checkpoint_every=6", "data.max_records=300"]
    plan["stages"][1]["set"] += ["steps=8", "eval.every=4", "checkpoint_every=4", "data.max_records=300"]
    plan["stages"][2]["set"] += ["steps=4", "eval.every=4", "checkpoint_every=4", "objective.kl_pairs=4"]
    plan["stages"][2]["pairs"] = str(CONFIGS / "pairs" / "demo-identity.yaml")
    plan["stages"][2]["pairs_set"] = ["samples=2", "max_tokens=12", "max_pairs_per_prompt=2"]
    plan["eval"] = {"tasks": ["moeforge_identity"], "limit": 2}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_crashed_plan_resumes_in_its_stage_and_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    plan, out = _plan(tmp_path), tmp_path / "out"
    seen: list[tuple[int, int]] = []

    def crash_in_sft(step: int, total: int, scalars: dict[str, float]) -> None:
        seen.append((step, total))
        if total == 8 and step == 6:  # the SFT stage, after its step-4 checkpoint
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_curriculum(plan, out=out, train_progress=crash_in_sft)
    state = json.loads((out / "curriculum.json").read_text())
    assert state["stages"]["pretrain"]["status"] == "done"
    assert state["stages"]["sft"]["status"] == "running"
    pretrain_ckpt = Path(state["stages"]["pretrain"]["checkpoint"])
    mtime = (pretrain_ckpt / "model.safetensors").stat().st_mtime_ns

    steps: list[int] = []
    res = run_curriculum(plan, out=out, train_progress=lambda s, t, _: steps.append(s))
    assert steps[:4] == [5, 6, 7, 8]  # SFT continued from its step-4 checkpoint, not from 0
    assert (pretrain_ckpt / "model.safetensors").stat().st_mtime_ns == mtime  # pretrain was not rerun
    stages = res.state["stages"]
    assert [stages[s]["status"] for s in ("pretrain", "sft", "align")] == ["done"] * 3
    sft_train = [r["step"] for r in _rows(out / "sft" / "train") if r["split"] == "train"]
    assert sft_train == sorted(set(sft_train)) and sft_train[-1] == 8  # no step logged twice
    assert stages["sft"]["data"]["kind"] == "run" and len(stages["sft"]["data"]["manifest_sha256"]) == 64
    assert stages["align"]["data"]["kind"] == "pairs"
    assert "rewards/accuracy" in stages["align"]["final_valid"]
    assert Path(stages["align"]["checkpoint"]).parent.parent == out / "align" / "train"
    # the SFT stage started from the pretrain stage's checkpoint, the DPO stage from SFT's
    sft_cfg = json.loads((out / "sft" / "train" / "config.json").read_text())
    assert sft_cfg["init_from"]["path"] == str(pretrain_ckpt.resolve())
    pairs = json.loads((out / "align" / "pairs" / "manifest.json").read_text())
    assert pairs["counts"]["pairs"] > 0
    for name in ("pretrain", "sft", "align"):
        assert "moeforge_identity" in stages[name]["eval"]
    assert (out / "loss.png").is_file() and "align" in (out / "report.html").read_text()

    # a third run does nothing but the report; an edited plan is refused without --restart
    steps.clear()
    run_curriculum(plan, out=out, train_progress=lambda s, t, _: steps.append(s))
    assert steps == []
    edited = yaml.safe_load(plan.read_text())
    edited["stages"][1]["set"].append("optim.lr=5.0e-4")
    plan.write_text(yaml.safe_dump(edited))
    with pytest.raises(CurriculumError, match="--restart"):
        run_curriculum(plan, out=out)


def test_plan_errors_are_clear(tmp_path: Path) -> None:
    bad = {"stages": [{"name": "a", "kind": "preference", "train": "x.yaml", "pairs": "p.yaml"}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="first stage has no previous checkpoint"):
        run_curriculum(path, out=tmp_path / "o")
    ok = {"stages": [{"name": "a", "kind": "pretrain", "train": "missing.yaml"}]}
    path.write_text(yaml.safe_dump(ok))
    with pytest.raises(CurriculumError, match=r"missing\.yaml does not exist"):
        run_curriculum(path, out=tmp_path / "o")


@pytest.mark.parametrize(
    "path",
    sorted(
        [*CONFIGS.glob("train/*.yaml"), *CONFIGS.glob("pairs/*.yaml"), *CONFIGS.glob("curriculum/*.yaml")]
    ),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_shipped_training_pairs_and_curriculum_config_validates(path: Path) -> None:
    from moeforge.config import load_yaml_config
    from moeforge.curriculum import CurriculumPlan
    from moeforge.data.pairgen import load_generate_config
    from moeforge.train.config import load_train_config

    kind = path.parent.name
    if kind == "train":
        load_train_config(path)
    elif kind == "pairs":
        load_generate_config(path)
    else:
        plan = load_yaml_config(CurriculumPlan, path)
        for stage in plan.stages:  # the stage configs a plan names exist, relative to the plan
            assert (path.parent / stage.train).is_file(), stage.train
            assert stage.pairs is None or (path.parent / stage.pairs).is_file(), stage.pairs
