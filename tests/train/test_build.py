"""The run's build functions and the objective interface, each called alone (as a curriculum stage or a
script would), and the trainer assembled from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeforge.model import router as router_mod
from moeforge.model.router import Router
from moeforge.train.build import (
    build_loader,
    build_model,
    check_start,
    open_splits,
    prepare_run,
    restore,
)
from moeforge.train.checkpoint import CheckpointError, list_checkpoints
from moeforge.train.config import load_train_config, resolve_model
from moeforge.train.distributed import DistInfo
from moeforge.train.objectives import LanguageModeling, build_objective
from moeforge.train.optim import build_optimizer
from moeforge.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _cfg(make_config, tmp_path: Path, **extra):
    return load_train_config(make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", **extra)))


def test_build_functions_assemble_a_model_loader_and_optimizer_alone(make_config, tmp_path: Path) -> None:
    cfg = _cfg(make_config, tmp_path)
    inputs = prepare_run(cfg)
    assert inputs.tokens == Path(cfg.data.tokens) and inputs.init_from is None
    splits = open_splits(inputs.tokens)
    assert splits.vocab_size == 96 and len(splits.train) == 64
    assert splits.valid is not None and splits.test is not None
    mc = resolve_model(cfg, splits.vocab_size)
    a = build_model(mc, seed=cfg.seed, device=CPU.device)
    b = build_model(mc, seed=cfg.seed, device=CPU.device)
    c = build_model(mc, seed=cfg.seed + 1, device=CPU.device)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.embed.weight, c.embed.weight)
    loader = build_loader(splits.train, cfg, CPU)
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (cfg.micro_batch, cfg.data.seq_len)
    opt = build_optimizer(a, cfg.optim)
    res = LanguageModeling(CPU.device, "fp32", document=True)(a, batch)
    res.loss.backward()
    opt.step()
    assert not torch.equal(a.embed.weight, b.embed.weight)  # it trained


def test_language_modeling_is_lm_plus_aux_and_reports_both(make_config, tmp_path: Path) -> None:
    cfg = _cfg(make_config, tmp_path)
    splits = open_splits(Path(cfg.data.tokens))
    model = build_model(resolve_model(cfg, splits.vocab_size), seed=0, device=CPU.device)
    batch = build_loader(splits.train, cfg, CPU).next_batch()
    objective = build_objective("lm", CPU.device, "fp32", document=True)
    assert objective.scalar_names == ("loss", "aux_loss")
    res = objective(model, batch)
    model.eval()  # no router noise: the reference forward routes the same
    res_eval = objective(model, batch)
    out = model(
        batch["input_ids"],
        labels_BT=batch["labels"],
        doc_ids_BT=batch["doc_ids"],
        positions_BT=batch["positions"],
    )
    assert out.loss is not None and out.aux_loss is not None
    assert torch.equal(res_eval.loss, out.loss + out.aux_loss)
    assert torch.equal(res_eval.scalars["loss"], out.loss) and torch.equal(
        res_eval.scalars["aux_loss"], out.aux_loss
    )
    assert res.tokens == batch["input_ids"].numel()
    assert set(res.moe_stats) == set(out.moe_stats) and res.moe_stats
    assert res.loss.requires_grad and not res.scalars["loss"].requires_grad


def test_an_unknown_objective_is_named() -> None:
    with pytest.raises(ValueError, match=r"objective: unknown 'kto'.*lm, dpo, ipo, simpo"):
        build_objective("kto", torch.device("cpu"), "fp32", document=True)


def test_check_start_refuses_another_runs_checkpoints_before_any_tokenizing(
    make_config, tmp_path: Path
) -> None:
    cfg = _cfg(make_config, tmp_path, steps=4, checkpoint_every=4)
    Trainer.from_config(cfg, CPU).run()
    run = Path(cfg.out_dir)
    with pytest.raises(CheckpointError, match=r"--resume.*--overwrite"):
        check_start(run, resume=False, overwrite=False)
    assert [s for s, _ in check_start(run, resume=True, overwrite=False)] == [4]
    assert check_start(tmp_path / "empty", resume=False, overwrite=False) == []


def test_restore_loads_model_optimizer_and_named_parts(make_config, tmp_path: Path) -> None:
    cfg = _cfg(make_config, tmp_path, steps=4, checkpoint_every=4)
    t = Trainer.from_config(cfg, CPU)
    t.run()
    ckpt = list_checkpoints(Path(cfg.out_dir))[-1][1]
    splits = open_splits(Path(cfg.data.tokens))
    model = build_model(t.model_cfg, seed=99, device=CPU.device)
    opt = build_optimizer(model, cfg.optim)
    loader = build_loader(splits.train, cfg, CPU)
    r = restore(ckpt, model, opt, {"loader": loader}, world_size=1)
    assert (r.step, r.tokens_seen) == (4, t.tokens_seen) and r.best_valid == t.best_valid
    assert loader.state_dict() == t.loader.state_dict()
    for (k, a), b in zip(model.state_dict().items(), t.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match=r"a run with 1 processes; resume with the same number"):
        restore(ckpt, model, opt, {}, world_size=2)


def test_the_router_makes_its_loads_global_through_the_count_reducer() -> None:
    """The aux-free bias moves by the loads the reducer returns (the sum over processes under DDP)."""
    router = Router(8, 4, 1, aux_free_bias_rate=0.5)
    router.train()
    router.load_since_step.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    seen: list[torch.Tensor] = []

    def other_rank_adds(t: torch.Tensor) -> torch.Tensor:  # as if a second process routed 6 to expert 1
        seen.append(t.clone())
        return t + torch.tensor([0.0, 6.0, 0.0, 0.0])

    router_mod.set_count_reducer(other_rank_adds)
    try:
        router.step()
    finally:
        router_mod.set_count_reducer(None)
    assert len(seen) == 1 and torch.equal(seen[0], torch.tensor([4.0, 0.0, 0.0, 0.0]))
    # global loads [4, 6, 0, 0], mean 2.5: experts 0 and 1 move down, 2 and 3 up
    assert router.expert_bias.tolist() == [-0.5, -0.5, 0.5, 0.5]
    assert router.load_since_step.sum() == 0
