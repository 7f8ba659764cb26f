"""Fine-tuning from a checkpoint: ``init_from`` (model config, weights, vocabulary and tokenizer from the
checkpoint), ``freeze`` (frozen weights stay bit-identical and stay out of the optimizer), the resolved
config recording the checkpoint, and bit-exact resume with freezing on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moeforge.config import ConfigError
from moeforge.io import sha256_file
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import MoETransformer
from moeforge.train.checkpoint import CheckpointError, latest_checkpoint
from moeforge.train.config import FreezeConfig, TrainConfig, load_train_config, resolve_tokenizer
from moeforge.train.distributed import DistInfo
from moeforge.train.optim import freeze_parameters
from moeforge.train.run import run_training
from moeforge.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
BASE_VOCAB = 100  # not a multiple of 64: vocab_from_tokenizer rounding would change it


@pytest.fixture
def base(make_config, tmp_path: Path) -> dict[str, Any]:
    """A 3-layer, untied, vocab-100 model trained 4 steps on the synthetic tokens (vocab 96)."""
    c = make_config(tmp_path / "base", steps=4, checkpoint_every=4, eval={"every": 4, "max_batches": 1})
    c["model_overrides"].update(n_layers=3, tie_embeddings=False, vocab_size=BASE_VOCAB)
    c["vocab_from_tokenizer"] = False
    run_training(make_config.write(tmp_path / "base.yaml", c))
    ckpt = latest_checkpoint(tmp_path / "base")
    assert ckpt is not None
    return {"make": make_config, "tokens": make_config.tokens, "run": tmp_path / "base", "ckpt": ckpt}


def _ft_config(base: dict[str, Any], out: Path, **extra: Any) -> dict[str, Any]:
    """The small config fine-tuning ``base``: init_from its run directory, no ``model``, no overrides."""
    c = base["make"](out, **{"init_from": str(base["run"]), **extra})
    del c["model"]
    c["model_overrides"] = extra.get("model_overrides", {})
    return c


def _load(path: Path, cfg: dict[str, Any]) -> TrainConfig:
    path.write_text(yaml.safe_dump(cfg))
    return load_train_config(path)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_init_from_a_run_starts_from_the_checkpoint_weights_and_model_config(base, tmp_path: Path) -> None:
    c = _ft_config(base, tmp_path / "ft", model_overrides={"moe": {"router_noise_std": 0.05}})
    t = Trainer.from_config(_load(tmp_path / "ft.yaml", c), CPU)
    state = json.loads((base["ckpt"] / "state.json").read_text())
    expected = {**state["model_config"], "moe": {**state["model_config"]["moe"], "router_noise_std": 0.05}}
    assert t.model_cfg.model_dump(mode="json") == expected
    assert t.model_cfg.vocab_size == BASE_VOCAB  # the checkpoint's, not the tokenizer's rounded up (128)
    weights = load_file(str(base["ckpt"] / "model.safetensors"))
    current = t.model.state_dict()
    assert weights.keys() == current.keys()
    for k, v in weights.items():
        assert torch.equal(v, current[k]), k
    resolved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert resolved["init_from"] == {
        "path": str(base["ckpt"].resolve()),
        "model_sha256": sha256_file(base["ckpt"] / "model.safetensors"),
    }
    assert "model" not in resolved["train"]  # the saved config validates again as it stands
    TrainConfig.model_validate(resolved["train"])

    # a checkpoint directory works the same; the init weights are loaded before the first step only
    c2 = _ft_config(base, tmp_path / "ft2")
    c2["init_from"] = str(base["ckpt"])
    t2 = Trainer.from_config(_load(tmp_path / "ft2.yaml", c2), CPU)
    assert torch.equal(t2.model.embed.weight, weights["embed.weight"])


def test_model_and_init_from_together_and_bad_checkpoints_are_clear_errors(base, tmp_path: Path) -> None:
    c = _ft_config(base, tmp_path / "ft")
    c["model"] = "tiny"
    with pytest.raises(ConfigError, match=r"`model` and `init_from` are both given"):
        _load(tmp_path / "a.yaml", c)
    c["model"] = None  # `--set model=null` unsets a config's model for init_from
    assert _load(tmp_path / "a.yaml", c).model is None

    for path, what in (
        (tmp_path / "nope", "does not exist"),
        (tmp_path / "empty", "missing model.safetensors, state.json"),
        (tmp_path / "emptyrun", "no complete checkpoint"),
    ):
        if path.name == "empty":
            path.mkdir()
        if path.name == "emptyrun":
            (path / "checkpoints" / "step-00000004").mkdir(parents=True)  # incomplete
        c = _ft_config(base, tmp_path / "ft", init_from=str(path))
        with pytest.raises(ConfigError, match=rf"init_from: {path}.*{what}"):
            Trainer.from_config(_load(tmp_path / "b.yaml", c), CPU)

    c = _ft_config(base, tmp_path / "ft", model_overrides={"d_model": 64, "moe": {"lb_coef": 0.02}})
    with pytest.raises(
        CheckpointError, match=r"model_overrides\.d_model \(32 → 64\) changes the weight shapes"
    ):
        Trainer.from_config(_load(tmp_path / "c.yaml", c), CPU)

    big = tmp_path / "bigvocab"
    shutil.copytree(base["tokens"], big)
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 300
    (big / "manifest.json").write_text(json.dumps(manifest))
    c = _ft_config(base, tmp_path / "ft")
    c["data"]["tokens"] = str(big)
    with pytest.raises(ConfigError, match=r"tokenizer has 300 tokens.*vocab_size 100"):
        Trainer.from_config(_load(tmp_path / "d.yaml", c), CPU)

    c = _ft_config(base, tmp_path / "ft", freeze={"blocks": 4})
    with pytest.raises(ConfigError, match=r"freeze\.blocks is 4 .* 3 blocks"):
        Trainer.from_config(_load(tmp_path / "e.yaml", c), CPU)


def test_frozen_weights_stay_identical_stay_out_of_the_optimizer_and_resume_is_bit_exact(
    base, tmp_path: Path
) -> None:
    freeze = {"blocks": 2, "embeddings": True}
    ref_cfg = _load(tmp_path / "ref.yaml", _ft_config(base, tmp_path / "ref", steps=8, freeze=freeze))
    ref = Trainer.from_config(ref_cfg, CPU)
    before = _params(ref.model)
    trainable = {id(p) for p in ref.model.parameters() if p.requires_grad}
    in_opt = [p for g in ref.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == trainable and len(in_opt) == len(trainable)
    assert ref.frozen.trainable == sum(p.numel() for p in in_opt) < ref.frozen.total
    ref.run()
    after = _params(ref.model)
    frozen = [k for k in before if k.startswith(("embed.", "blocks.0.", "blocks.1."))]
    live = [k for k in before if k not in frozen]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert "lm_head.weight" in live  # untied: frozen only with freeze.lm_head
    assert all(not torch.equal(before[k], after[k]) for k in live if k.endswith(("w13", "lm_head.weight")))
    opt_keys = load_file(str(latest_checkpoint(tmp_path / "ref") / "optimizer.safetensors")).keys()
    assert len({k.split(".")[1] for k in opt_keys}) == len(trainable)  # state for trainable params only
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["params_trainable"] == ref.frozen.trainable

    # stop after step 4 with a checkpoint, resume in a new trainer: same losses and weights, bit for bit
    cfg = _load(tmp_path / "k.yaml", _ft_config(base, tmp_path / "k", steps=8, freeze=freeze))
    first = Trainer.from_config(cfg, CPU)
    assert first.run(should_stop=lambda: first.step >= 4).status == "stopped"
    res = Trainer.from_config(cfg, CPU, resume=True).run()
    assert res.steps == 8
    assert _train_losses(tmp_path / "k") == _train_losses(tmp_path / "ref")
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "k") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming with other freeze settings names them
    other = _load(tmp_path / "o.yaml", _ft_config(base, tmp_path / "k", steps=8, freeze={"blocks": 1}))
    with pytest.raises(CheckpointError, match="same freeze settings"):
        Trainer.from_config(other, CPU, resume=True)


def test_freezing_a_tied_embedding_freezes_the_head() -> None:
    mc = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, tie_embeddings=True)
    model = MoETransformer(mc)
    with pytest.raises(ConfigError, match=r"freeze\.lm_head.*freeze\.embeddings"):
        freeze_parameters(model, FreezeConfig(lm_head=True))
    model = MoETransformer(mc)
    info = freeze_parameters(model, FreezeConfig(embeddings=True))
    assert not model.lm_head.weight.requires_grad and info.frozen == 64 * 16


def test_the_tokenizer_comes_from_the_checkpoint_when_data_tokenizer_is_omitted(
    make_config, token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    from moeforge.tokens.tokenizer import tokenizer_sha256

    data = {"run": str(token_run), "seq_len": 32, "max_records": 40, "cache_dir": str(tmp_path / "cache")}
    c = make_config(tmp_path / "base", steps=2, checkpoint_every=2, eval={"every": 2, "max_batches": 1})
    c["data"] = {**data, "tokenizer": str(token_tokenizer)}
    run_training(make_config.write(tmp_path / "base.yaml", c))
    assert (tmp_path / "base" / "tokenizer" / "tokenizer.json").is_file()

    c = make_config(tmp_path / "ft", steps=2, init_from=str(tmp_path / "base"))
    del c["model"], c["model_overrides"]
    c["data"] = data  # no data.tokenizer: the run's tokenizer/ beside checkpoints/
    t = Trainer.from_config(_load(tmp_path / "ft.yaml", c), CPU)
    manifest = json.loads((t.tokens_dir / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == tokenizer_sha256(token_tokenizer)
    assert t.model_cfg.vocab_size == 640  # the checkpoint's (600 rounded when it was trained)
    t.close()  # a trainer that is not run releases its directory explicitly

    # an imported checkpoint carries tokenizer/ itself, and that one wins
    imported = tmp_path / "imported"
    shutil.copytree(latest_checkpoint(tmp_path / "base"), imported)
    shutil.copytree(token_tokenizer, imported / "tokenizer")
    cfg = _load(tmp_path / "imp.yaml", {**c, "init_from": str(imported)})
    assert resolve_tokenizer(cfg) == imported / "tokenizer"

    # no tokenizer anywhere: the error says to set data.tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(latest_checkpoint(tmp_path / "base"), bare)
    with pytest.raises(ConfigError, match=r"carries no tokenizer.*set data\.tokenizer"):
        Trainer.from_config(_load(tmp_path / "bare.yaml", {**c, "init_from": str(bare)}), CPU)
    with pytest.raises(ConfigError, match=r"data\.run needs data\.tokenizer.*or init_from"):
        _load(tmp_path / "x.yaml", {**c, "init_from": None})
