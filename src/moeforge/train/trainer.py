"""The training loop: LM + MoE aux losses, eval, checkpoint/resume, routing metrics, collapse, ghosts.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` sequences per process. Per step:
learning rate from the schedule (a pure function of the step) → forward/backward of each micro-batch
with ``loss = LM + lb_coef·LB + z_coef·Z`` (the model's ``aux_loss``) → grad clipping → AdamW step
(ghost rows blended by their α) → router step (noise annealing, aux-free bias) → ghost controller.
Every ``log_every`` steps the routing statistics gathered since the last log go to ``metrics.jsonl``
and to the collapse detector; every ``eval.every`` steps the validation split is evaluated overall
and per domain; every ``checkpoint_every`` steps (and at the end) a checkpoint is written.

Determinism: a seed fixes the initialization, the data order (the loader is a pure function of seed,
epoch and position) and the router noise (torch's generator, saved in checkpoints). On CPU a run
killed at any point and resumed from its last checkpoint produces the same losses and weights, bit for
bit, as one that never stopped.

Fine-tuning (``init_from``): the model is built from the checkpoint's model config and its weights are
loaded before the first step (not on ``--resume`` from the run's own checkpoint); ``freeze`` then sets
``requires_grad=False`` on the frozen parameters before the optimizer is built. ``config.json`` records
the resolved checkpoint and the sha256 of its ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeforge.config import ConfigError
from moeforge.io import DirectoryLock, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from moeforge.model import grad_buffers
from moeforge.model.config import ModelConfig
from moeforge.model.moe import MoELayer
from moeforge.model.sizing import count_params, flops_per_token
from moeforge.tokens.loader import TokenDataset, TokenLoader
from moeforge.tokens.pairs import PairData, open_pair_data
from moeforge.train import checkpoint as ckpt
from moeforge.train import expert_parallel as ep
from moeforge.train import fsdp
from moeforge.train.build import (
    RunInputs,
    build_loader,
    build_model,
    check_start,
    open_splits,
    prepare_run,
    restore,
    seed_everything,
    shape_changing_overrides,
)
from moeforge.train.collapse import CollapseDetector
from moeforge.train.config import TrainConfig, checkpoint_model_config, resolve_model, resolve_tokenizer
from moeforge.train.distributed import DistInfo, accumulation_dtype, all_reduce_mean, barrier, wrap_model
from moeforge.train.evaluation import eval_batches, evaluate
from moeforge.train.ghost import GhostController
from moeforge.train.guard import check_resources
from moeforge.train.metric_log import MetricsWriter
from moeforge.train.metrics import RoutingAccumulator, Throughput, measure_peak_flops, mfu
from moeforge.train.objectives import build_objective
from moeforge.train.optim import build_optimizer, freeze_parameters, lr_at, set_lr
from moeforge.train.pairdata import PairLoader, attach_references, evaluate_pairs, kl_to_reference

__all__ = ["ProgressFn", "TrainResult", "Trainer"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    status: str  # "completed" | "collapsed" | "stopped"
    final_valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    collapse_events: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Assembles a run from its build functions (:mod:`moeforge.train.build`) and runs it; see the module
    docstring. :meth:`from_config` is the whole assembly, data preparation included."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        inputs: RunInputs,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        """``inputs``: the prepared data and init checkpoint (:func:`~moeforge.train.build.prepare_run`).
        ``resume`` continues from the run's latest checkpoint; without it a directory that holds an
        earlier run's checkpoints is refused (:class:`~moeforge.train.checkpoint.CheckpointError`) unless
        ``overwrite``, which deletes that run's checkpoints, metrics and summary first. The main process
        holds ``RUN/.lock`` from here until :meth:`run` ends or :meth:`close` (a second trainer on the same
        directory gets :class:`~moeforge.io.DirectoryLockedError`)."""
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.run_dir = Path(cfg.out_dir)
        self._lock = DirectoryLock(self.run_dir, "the training run") if info.is_main else None
        try:
            self._setup(inputs, resume, overwrite)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, info: DistInfo, *, resume: bool = False, overwrite: bool = False
    ) -> Trainer:
        """Refuse early when the directory holds another run (before any tokenizing), prepare the data,
        then build the trainer."""
        check_start(Path(cfg.out_dir), resume=resume, overwrite=overwrite)
        return cls(cfg, info, prepare_run(cfg, info), resume=resume, overwrite=overwrite)

    def close(self) -> None:
        """Release the run directory's lock (idempotent; :meth:`run` calls it when it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start_over(self, resume: bool, overwrite: bool) -> None:
        """Refuse to train over an earlier run's checkpoints unless told to (see :meth:`__init__`)."""
        found = check_start(self.run_dir, resume=resume, overwrite=overwrite)
        if resume or not found:
            return
        if self.info.is_main:
            log.warning("--overwrite: deleting the earlier run's checkpoints and metrics in %s", self.run_dir)
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                (self.run_dir / name).unlink(missing_ok=True)

    def _setup(self, inputs: RunInputs, resume: bool, overwrite: bool) -> None:
        cfg, info = self.cfg, self.info
        self._start_over(resume, overwrite)
        self.document = cfg.data.attention == "document"
        seed_everything(cfg.seed)

        self.init_ckpt: Path | None = inputs.init_from
        self.tokens_dir = inputs.tokens
        self.pairs: PairData | None = None
        self.train_ds = self.valid_ds = self.test_ds = None
        if inputs.pairs is not None:
            tok_dir = resolve_tokenizer(cfg, self.init_ckpt)
            assert tok_dir is not None  # the config validator requires a tokenizer source with data.pairs
            self.pairs = open_pair_data(inputs.pairs, tok_dir, max_len=cfg.data.seq_len)
            vocab = self.pairs.vocab_size
        else:
            assert inputs.tokens is not None
            splits = open_splits(inputs.tokens)
            self.train_ds, self.valid_ds, self.test_ds = splits.train, splits.valid, splits.test
            vocab = splits.vocab_size
        self.model_cfg: ModelConfig = resolve_model(cfg, vocab, checkpoint=self.init_ckpt)
        dtype = (
            "bfloat16"
            if (cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"))
            else "float32"
        )
        self.resources = check_resources(
            self.model_cfg,
            micro_batch=cfg.micro_batch * (2 if self.pairs is not None else 1),  # a pair is two rows
            seq_len=cfg.data.seq_len,
            device=self.device,
            dtype=dtype,
            shard_over=info.world_size if cfg.distributed == "fsdp" else 1,
        )

        self.model = build_model(self.model_cfg, seed=cfg.seed, device=self.device)
        self.ghost = GhostController(self.model, cfg.ghost)
        self.frozen = freeze_parameters(self.model, cfg.freeze)
        if info.is_main:
            log.info(
                "parameters: %d trainable of %d (%.1f%%)%s",
                self.frozen.trainable,
                self.frozen.total,
                100.0 * self.frozen.trainable / max(self.frozen.total, 1),
                f"; frozen: {_describe_freeze(cfg)}" if self.frozen.frozen else "",
            )
        o = cfg.objective
        self.objective = build_objective(
            o.name,
            self.device,
            cfg.precision,
            document=self.document,
            beta=o.beta,
            simpo_gamma=o.simpo_gamma,
            nll_coef=o.nll_coef,
        )
        self.collapse = CollapseDetector.from_config(cfg.collapse)
        self.loader: TokenLoader | PairLoader
        if self.pairs is not None:
            self.loader = PairLoader(
                self.pairs.splits["train"],
                batch_pairs=cfg.micro_batch,
                seed=cfg.seed,
                pad=self.pairs.pad,
                rank=info.rank,
                world_size=info.world_size,
            )
        else:
            assert self.train_ds is not None
            self.loader = build_loader(self.train_ds, cfg, info)
        self.step = 0
        self.tokens_seen = 0
        self.best_valid: float | None = None
        self.init_sha256: str | None = None
        latest = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and latest is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", self.run_dir)
        needs_ref = o.name in ("dpo", "ipo")
        if self.init_ckpt is not None:
            if info.is_main or needs_ref:
                self.init_sha256 = sha256_file(self.init_ckpt / "model.safetensors")
            # a resumed run continues from its own checkpoint, but a reference is computed from the
            # init weights first (a cache hit on resume skips the computation)
            if latest is None or needs_ref:
                self._load_init(self.init_ckpt)
        if needs_ref:
            assert self.pairs is not None and self.init_sha256 is not None
            attach_references(
                self.pairs,
                self.model,
                self.run_dir / "reference",
                model_sha256=self.init_sha256,
                batch_pairs=cfg.micro_batch,
                info=info,
            )
        # FSDP replaces the parameters by their shards: wrap first, then build the optimizer over them (and
        # restore into both); DDP broadcasts rank 0's weights, which the restore then overwrites alike
        self.expert_parallel = cfg.parallel.expert > 1
        if (
            self.expert_parallel
        ):  # experts sharded over the ranks, DDP over the rest (train/expert_parallel.py)
            if cfg.parallel.expert != info.world_size:
                raise ConfigError(
                    f"parallel.expert={cfg.parallel.expert} needs exactly that many processes (torchrun "
                    f"--nproc-per-node {cfg.parallel.expert}); this run has {info.world_size}"
                )
            ep.apply_expert_parallel(self.model)
            self.ddp_model = ep.wrap_ddp_expert_parallel(self.model, self.device)
        elif info.enabled and cfg.distributed == "fsdp":
            bf16 = torch.bfloat16 if dtype == "bfloat16" else None
            self.ddp_model = fsdp.shard_model(self.model, device=self.device, param_dtype=bf16)
        else:
            self.ddp_model = wrap_model(self.model, info, cfg.distributed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # between the local expert shards and the whole tensors every checkpoint holds
        self._whole, self._local = (
            ep.checkpoint_transforms(self.model, self.optimizer) if self.expert_parallel else (None, None)
        )
        if latest is not None:
            r = restore(
                latest,
                self.model,
                self.optimizer,
                {"loader": self.loader, "collapse": self.collapse, "ghost": self.ghost},
                world_size=info.world_size,
                freeze=cfg.freeze.model_dump(mode="json"),
                local=self._local,
            )
            self.step, self.tokens_seen, self.best_valid = r.step, r.tokens_seen, r.best_valid
        if cfg.compile:
            self.ddp_model = torch.compile(self.ddp_model)  # type: ignore[assignment]
        # expert weight gradients into persistent buffers where no wrapper's autograd hooks need them
        self._grad_buffers: list[torch.Tensor] = []
        if cfg.persistent_expert_grads and not info.enabled and not cfg.compile and self.device.type == "cpu":
            self._grad_buffers = grad_buffers.attach(
                p for m in self.model.modules() if isinstance(m, MoELayer) for p in (m.w13, m.w2)
            )
        # a resumed run drops the log lines after its checkpoint (they are trained again); a fresh one
        # starts an empty log
        self.writer = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.tensorboard,
            rank=info.rank,
            truncate_after_step=self.step if resume else -1,
        )
        self.routing = RoutingAccumulator()
        self.throughput = Throughput()
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)["training"]
        self.peak = cfg.peak_flops
        if info.is_main:
            self._write_config()

    # ---- setup helpers ---------------------------------------------------------------------------------
    def _load_init(self, path: Path) -> None:
        """Load the init_from weights; a mismatch caused by ``model_overrides`` says which override."""
        try:
            ckpt.load_checkpoint(path, self.model, None, restore_rng_state=False)
        except ckpt.CheckpointError as exc:
            culprits = shape_changing_overrides(checkpoint_model_config(path), self.cfg.model_overrides)
            if not culprits:
                raise
            raise ckpt.CheckpointError(
                f"{exc}\nmodel_overrides.{', model_overrides.'.join(culprits)} changes the weight shapes of "
                "the init_from checkpoint's model; with init_from only shape-preserving overrides apply "
                "(router noise, lb_coef, …): remove it"
            ) from exc
        log.info("initialized from %s", path)

    def _config_dump(self) -> dict[str, Any]:
        """The train config as saved: without ``model`` under init_from (it may not be given then)."""
        return self.cfg.model_dump(mode="json", exclude={"model"} if self.cfg.init_from else None)

    def _init_record(self) -> dict[str, Any] | None:
        if self.init_ckpt is None:
            return None
        return {"path": str(self.init_ckpt), "model_sha256": self.init_sha256}

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tok_src = self.pairs.tokenizer_dir if self.pairs is not None else self.tokens_dir / "tokenizer"  # type: ignore[operator]
        if tok_src.is_dir():  # the run carries its tokenizer: checkpoints can be served and exported alone
            for f in sorted(tok_src.iterdir()):
                atomic_write_bytes(self.run_dir / "tokenizer" / f.name, f.read_bytes())
        resolved = {
            "train": self._config_dump(),
            "model": self.model_cfg.model_dump(mode="json"),
            "tokens": str(self.tokens_dir) if self.tokens_dir is not None else None,
            "pairs": self.pairs.summary() if self.pairs is not None else None,
            "world_size": self.info.world_size,
            "init_from": self._init_record(),
            "params_trainable": self.frozen.trainable,
        }
        atomic_write_json(self.run_dir / "config.json", resolved)

    def _state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "best_valid": self.best_valid,
            "loader": self.loader.state_dict(),
            "collapse": self.collapse.state_dict(),
            "ghost": self.ghost.state_dict(),
            "config": self._config_dump(),
            "init_from": self._init_record(),
            "model_config": self.model_cfg.model_dump(mode="json"),
            "world_size": self.info.world_size,
        }

    def save(self, metric: float | None = None) -> Path | None:
        barrier(self.info)
        whole = None
        if self._whole is not None:  # expert shards gathered by every process, written by rank 0
            gathered = self._whole(ckpt.model_state(self.model), ckpt.optimizer_tensors(self.optimizer))

            def whole(_w: dict[str, torch.Tensor], _o: dict[str, torch.Tensor]) -> Any:
                return gathered

        if not self.info.is_main and not fsdp.is_sharded(self.model):  # FSDP: every process writes its shards
            return None
        return ckpt.save_checkpoint(
            self.run_dir,
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            state=self._state(),
            keep_last=self.cfg.keep_last,
            metric=metric,
            whole=whole,
        )

    # ---- the loop --------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self.cfg.grad_accum):
            yield i, self.loader.next_batch()

    def train_step(self) -> dict[str, float | torch.Tensor]:
        """One optimizer step; returns the step's scalars: ``lr`` and ``tokens_seen`` as floats, the
        objective's scalars and ``grad_norm`` as 0-d float64 tensors on the device, summed there over the
        micro-batches without a host sync; :meth:`_log` reads a whole window of them at once."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        names = self.objective.scalar_names
        dt = accumulation_dtype(self.device)
        sums_S = torch.zeros(len(names), dtype=dt, device=self.device)
        zero = sums_S.new_zeros(())
        tokens = 0
        # the router's mean distribution and entropy are computed only for the step that logs them
        logs = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
        for i, batch in self._micro_batches():
            last = i == cfg.grad_accum - 1
            # FSDP reduce-scatters every micro-batch's gradients into the shards (no no_sync)
            local = not last and self.info.enabled and not fsdp.is_sharded(self.model)
            sync = self.ddp_model.no_sync() if local else contextlib.nullcontext()  # type: ignore[operator]
            with sync:
                res = self.objective(self.ddp_model, batch)
                (res.loss / cfg.grad_accum).backward()
            # in float64, as Python floats summed them: the logged numbers are the same
            step_S = [
                res.scalars[k].detach().to(self.device, dt) if k in res.scalars else zero for k in names
            ]
            sums_S += torch.stack(step_S)
            tokens += res.tokens
            self.routing.add(res.moe_stats, detail=logs)
            self.ghost.observe(self.step, res.moe_stats)
        grad_buffers.publish(self._grad_buffers)
        grad_norm = torch.full((), float("nan"), dtype=dt, device=self.device)
        if cfg.optim.grad_clip is not None:
            grad_norm = fsdp.clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip).to(self.device, dt)
        with self.ghost.scaled_updates():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_buffers.begin_step(self._grad_buffers)
        self.model.router_step()  # aux-free biases move by the global loads (router.set_count_reducer)
        ghost_events = self.ghost.step(self.step)
        self.step += 1
        global_tokens = tokens * self.info.world_size
        self.tokens_seen += global_tokens
        self.throughput.update(global_tokens)
        out_scalars: dict[str, float | torch.Tensor] = {
            **dict(zip(names, sums_S / cfg.grad_accum, strict=True)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_seen": float(self.tokens_seen),
        }
        for e in ghost_events:
            self.writer.write(
                self.step,
                "event",
                {"ghost": e.kind, "layer": e.layer, "slot": e.slot, "saturation": e.saturation},
            )
        return out_scalars

    def run(
        self, progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        cfg = self.cfg
        if self.peak is None and self.info.is_main:
            # measured now, with this run's threads: a peak cached on a busier or quieter day (or another
            # thread count) made MFU come out above 1
            self.peak = measure_peak_flops(self.device, seconds=0.3, refresh=True)
        status = "completed"
        # a resumed run starts from the validation result its checkpoint's step had (a run resumed at its
        # last step trains nothing more, and its summary must still report it)
        valid: dict[str, float] = self.writer.last("valid")
        if self.pairs is not None and self.step == 0 and "valid" in self.pairs.splits:
            valid = self._eval_pairs("valid", cfg.eval.max_batches)  # the start: policy = reference
        window: list[dict[str, float | torch.Tensor]] = []
        logged: dict[str, Any] = {}  # the last train log's values, what the progress callback shows
        self.ddp_model.train()
        while self.step < cfg.steps:
            scalars = self.train_step()
            window.append(scalars)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                logged = self._log(window)
                window = []
                if self.collapse.should_stop:
                    status = "collapsed"
            if self._has_split("valid") and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                valid = self._eval_split("valid", cfg.eval.max_batches)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or status != "completed":
                self.save(metric=valid.get("loss") if valid and self.step % cfg.eval.every == 0 else None)
            if progress is not None:
                # the last logged numbers: reading this step's (on the device) would sync every step;
                # before the first log there are none, and this step's are read
                shown = logged or {k: float(v) for k, v in scalars.items()}
                now = {"lr": float(scalars["lr"]), "tokens_seen": float(scalars["tokens_seen"])}
                progress(self.step, cfg.steps, {**shown, **now, "tokens_per_s": self.throughput.tokens_per_s})
            if status != "completed":
                break
            if should_stop is not None and should_stop():
                status = "stopped"
                self.save()
                break
        test: dict[str, float] = {}
        if status == "completed" and cfg.eval.test_at_end and self._has_split("test"):
            test = self._eval_split("test", None)
        result = TrainResult(
            self.run_dir, self.step, status, valid, test, [e.__dict__ for e in self.collapse.events]
        )
        if self.info.is_main:
            self._write_summary(result)
        self.writer.close()
        self.close()
        return result

    def _has_split(self, split: str) -> bool:
        if self.pairs is not None:
            return split in self.pairs.splits
        return (self.valid_ds if split == "valid" else self.test_ds) is not None

    def _eval_split(self, split: str, max_batches: int | None) -> dict[str, float]:
        if self.pairs is not None:
            return self._eval_pairs(split, max_batches)
        ds = self.valid_ds if split == "valid" else self.test_ds
        assert ds is not None
        return self._eval(ds, split, max_batches)

    def _eval_pairs(self, split: str, max_batches: int | None) -> dict[str, float]:
        """The objective's metrics over the split's pairs and, with a reference, the KL to it."""
        assert self.pairs is not None
        data = self.pairs.splits[split]
        res = evaluate_pairs(
            self.model,
            self.objective,
            data,
            pad=self.pairs.pad,
            batch_pairs=self.cfg.micro_batch,
            max_batches=max_batches,
            info=self.info,
        )
        # (under FSDP every process runs the forwards, which all-gather; rank 0 reports)
        if (
            self.cfg.objective.kl_pairs
            and self.init_ckpt is not None
            and (self.info.is_main or fsdp.is_sharded(self.model))
        ):
            res["kl"] = kl_to_reference(
                self.model,
                self.init_ckpt,
                data,
                pad=self.pairs.pad,
                batch_pairs=self.cfg.micro_batch,
                max_pairs=self.cfg.objective.kl_pairs,
                device=self.device,
                precision=self.cfg.precision,
            )
        return self._record_eval(split, res)

    def _record_eval(self, split: str, res: dict[str, float]) -> dict[str, float]:
        if split == "valid" and "loss" in res and (self.best_valid is None or res["loss"] < self.best_valid):
            self.best_valid = res["loss"]
        self.writer.write(self.step, split, res)
        if self.info.is_main:
            extra = (
                f" accuracy {res['rewards/accuracy']:.3f} margin {res['rewards/margin']:.4f}"
                if "rewards/accuracy" in res
                else f" ppl {res.get('ppl', float('nan')):.2f}"
            )
            log.info("step %d %s loss %.4f%s", self.step, split, res.get("loss", float("nan")), extra)
        return res

    def _eval(self, ds: TokenDataset, split: str, max_batches: int | None) -> dict[str, float]:
        batches = eval_batches(
            ds,
            self.cfg.micro_batch,
            max_batches=max_batches,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        res = evaluate(
            self.model,
            batches,
            ds.domains,
            device=self.device,
            precision=self.cfg.precision,
            document=self.document,
            info=self.info,
        )
        return self._record_eval(split, res)

    def _log(self, window: list[dict[str, float | torch.Tensor]]) -> dict[str, Any]:
        """Write the train log line of ``window`` (the steps since the last one); returns its values."""
        keys = (*self.objective.scalar_names, "grad_norm")
        # the window's device scalars reach the host here, in one transfer: the only read of the step's
        # numbers (the progress callback shows the last logged ones)
        rows = (
            torch.stack([torch.stack([torch.as_tensor(w[k]) for k in keys]) for w in window]).cpu().tolist()
        )
        agg = {k: float(np.mean([row[j] for row in rows])) for j, k in enumerate(keys)}
        agg["loss"] = all_reduce_mean(agg["loss"], self.info)
        last = window[-1]
        tps = self.throughput.tokens_per_s
        values: dict[str, Any] = {
            **agg,
            "lr": last["lr"],
            "tokens_seen": last["tokens_seen"],
            "tokens_per_s": tps,
        }
        if self.peak:
            values["mfu"] = mfu(tps / max(self.info.world_size, 1), self.flops_per_token, self.peak)
        if self.model.moe_layers():
            self.routing.all_reduce(self.device)  # global loads, so every rank's collapse detector agrees
            values.update(self.routing.summary(self.model))
            events = self.collapse.check(self.step, self.routing.load_fractions())
            for e in events:
                self.writer.write(
                    self.step,
                    "event",
                    {"collapse": True, **{k: v for k, v in e.__dict__.items() if k != "step"}},
                )
        values.update(self.ghost.metrics())
        self.routing.reset()
        self.writer.write(self.step, "train", values)
        return values

    def _write_summary(self, result: TrainResult) -> None:
        p = count_params(self.model_cfg)
        summary = {
            "name": self.cfg.name,
            "status": result.status,
            "steps": result.steps,
            "tokens_seen": self.tokens_seen,
            "params_total": p.total,
            "params_active": p.active,
            "params_trainable": self.frozen.trainable,
            "best_valid_loss": self.best_valid,
            "final_valid": result.final_valid,
            "test": result.test,
            "collapse_events": result.collapse_events,
            "ghost_events": [e.__dict__ for e in self.ghost.events],
            "tokens_dir": str(self.tokens_dir) if self.tokens_dir is not None else None,
            "pairs_dir": str(self.pairs.root) if self.pairs is not None else None,
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def _describe_freeze(cfg: TrainConfig) -> str:
    f = cfg.freeze
    parts = (["embeddings"] if f.embeddings else []) + (["lm_head"] if f.lm_head else [])
    if f.blocks:
        parts.append(f"blocks 0..{f.blocks - 1}")
    return ", ".join(parts)
