"""Preference training through the trainer: ``objective: dpo`` on a pair set from ``init_from`` — the
reference computed once into the run's cache (and reused on resume), the MoE aux loss and the preference
metrics logged, held-out accuracy and KL at each eval, bit-exact resume; config errors are clear."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moeforge.data.contract import Message, Provenance, RecordMeta, SourceRef
from moeforge.data.pairset import PairSetConfig, write_pair_set
from moeforge.data.preference import PreferencePair, SideProvenance
from moeforge.data.recipe import SplitConfig
from moeforge.io import save_safetensors, write_checksums
from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.train.config import TrainConfig, load_train_config
from moeforge.train.distributed import DistInfo
from moeforge.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "small",
    "large",
    "quick",
    "slow",
    "warm",
    "cold",
]


def _pairs(n: int) -> list[PreferencePair]:
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 3) % len(WORDS)]
        meta = RecordMeta(
            source=SourceRef(uri="gen://test", line=i + 1),
            family="toy",
            domain="chat",
            provenance=Provenance(source_sha256="0" * 64, steps=["test"]),
        )
        src = SideProvenance(kind="rule", generator="test")
        out.append(
            PreferencePair.create(
                prompt=[Message(role="user", content=f"Question {i}: name a {a} thing and a {b} thing.")],
                chosen=[Message(role="assistant", content=f"A {a} cup and a {b} hat.")],
                rejected=[Message(role="assistant", content=f"No. {i}")],
                meta=meta,
                chosen_source=src,
                rejected_source=src,
            )
        )
    return out


@pytest.fixture(scope="module")
def setup(make_bpe: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pref")
    pairs = _pairs(48)
    text = " ".join(m.content for p in pairs for m in (*p.prompt, *p.chosen, *p.rejected))
    tok = make_bpe(text, vocab_size=300)
    cfg = PairSetConfig(split=SplitConfig(train=0.75, valid=0.25, test=0.0, min_eval_records=4))
    write_pair_set(pairs, root / "pairs", cfg)
    torch.manual_seed(0)
    vocab = -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64
    model = MoETransformer(load_model_config("tiny", [f"vocab_size={vocab}", "n_layers=2", "max_seq_len=64"]))
    init = root / "init"
    (init / "tokenizer").mkdir(parents=True)
    save_safetensors(
        {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"},
        init / "model.safetensors",
    )
    (init / "state.json").write_text(
        json.dumps({"step": 0, "model_config": model.cfg.model_dump(mode="json")})
    )
    tok.save(str(init / "tokenizer" / "tokenizer.json"))
    write_checksums(init)
    return {"root": root, "pairs": root / "pairs", "init": init}


def _config(setup: dict[str, Path], out: Path, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "dpo",
        "out_dir": str(out),
        "model": None,
        "init_from": str(setup["init"]),
        "data": {"pairs": str(setup["pairs"]), "seq_len": 64},
        "objective": {"name": "dpo", "beta": 0.5, "kl_pairs": 4},
        "steps": 8,
        "micro_batch": 4,
        "log_every": 2,
        "checkpoint_every": 4,
        "eval": {"every": 4, "max_batches": 2},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 0, "weight_decay": 0.0},
        "tensorboard": False,
    }
    c.update(extra)
    return c


def _load(path: Path, c: dict[str, Any]) -> TrainConfig:
    path.write_text(yaml.safe_dump(c))
    return load_train_config(path)


def _rows(run: Path, split: str) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_dpo_run_learns_logs_its_metrics_and_resumes_bit_exactly(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = _load(tmp_path / "a.yaml", _config(setup, out))
    res = Trainer.from_config(cfg, CPU).run()
    assert res.status == "completed" and res.steps == 8
    assert (out / "reference" / "train.safetensors").is_file() and (
        out / "reference" / "valid.safetensors"
    ).is_file()
    train = _rows(out, "train")
    for key in ("loss", "aux_loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"):
        assert key in train[-1], key
    assert train[-1]["aux_loss"] > 0  # the MoE load-balancing loss is still applied
    valid = _rows(out, "valid")
    assert valid[0]["step"] == 0 and valid[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert valid[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: rewards all zero
    assert valid[-1]["rewards/accuracy"] > 0.5 and valid[-1]["rewards/margin"] > 0 and valid[-1]["kl"] > 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["pairs"]["pairs"]["train"] + resolved["pairs"]["pairs"]["valid"] == 48
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # checkpoints can be served alone

    # stop after the step-4 checkpoint and resume: the same losses, the reference read from the cache
    out2 = tmp_path / "run2"
    part = _load(tmp_path / "b.yaml", _config(setup, out2, steps=8))
    t = Trainer.from_config(part, CPU)
    stop_at = {"n": 0}

    def should_stop() -> bool:
        stop_at["n"] += 1
        return stop_at["n"] == 4

    assert t.run(should_stop=should_stop).status == "stopped"
    cache = out2 / "reference" / "train.safetensors"
    mtime = cache.stat().st_mtime_ns
    Trainer.from_config(part, CPU, resume=True).run()
    assert cache.stat().st_mtime_ns == mtime  # reused, not recomputed
    full = {r["step"]: r["loss"] for r in _rows(out, "train")}
    resumed = {r["step"]: r["loss"] for r in _rows(out2, "train")}
    assert resumed == full


def test_preference_config_errors_name_the_fix(setup: dict[str, Path], tmp_path: Path) -> None:
    c = _config(setup, tmp_path / "x")
    c["init_from"] = None
    c["model"] = "tiny"
    with pytest.raises(ValueError, match="objective dpo needs init_from"):
        _load(tmp_path / "a.yaml", c)
    c = _config(setup, tmp_path / "x", objective={"name": "lm"})
    with pytest.raises(ValueError, match=r"data\.pairs is a preference pair set"):
        _load(tmp_path / "b.yaml", c)
    c = _config(setup, tmp_path / "x")
    c["data"] = {"tokens": str(tmp_path), "seq_len": 64}
    with pytest.raises(ValueError, match=r"set data\.pairs"):
        _load(tmp_path / "c.yaml", c)
    c = _config(setup, tmp_path / "x")
    c["data"] = {"pairs": str(tmp_path / "nowhere"), "seq_len": 64}
    with pytest.raises(ValueError, match="not a pair set"):
        Trainer.from_config(_load(tmp_path / "d.yaml", c), CPU)


def test_simpo_trains_without_a_reference_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "simpo"
    c = _config(setup, out, steps=2, objective={"name": "simpo", "beta": 2.0, "kl_pairs": 0})
    c["eval"] = {"every": 2, "max_batches": 1}
    res = Trainer.from_config(_load(tmp_path / "s.yaml", c), CPU).run()
    assert res.status == "completed" and not (out / "reference").exists()
    valid = _rows(out, "valid")
    # reference-free: the step-0 rewards are the policy's own (β × mean log-prob per token), not zero
    assert (
        valid[0]["step"] == 0 and valid[0]["rewards/chosen"] < 0 and valid[0]["loss"] != pytest.approx(0.6931)
    )
    assert "kl" not in valid[-1]
