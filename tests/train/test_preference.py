"""Preference losses (moeforge.train.preference): DPO and IPO equal TRL 1.16's DPOTrainer loss code on the
same log-probabilities (TRL's own ``_compute_loss`` runs, over a stand-in model that returns those
log-probs), SimPO follows its formula, the rewards and metrics mean what they say, bad settings are named."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moeforge.train.preference import preference_loss

PAIRS, T = 6, 9


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Per-token log-probs of ``PAIRS`` chosen then ``PAIRS`` rejected completions with different lengths,
    and the reference's, as TRL lays out a DPO batch (rows: chosen…, rejected…)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * PAIRS, T, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = int(torch.randint(1, 4, (1,), generator=g))
        stop = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[row, start:stop] = 1  # prompt tokens before start, padding after stop
    token_logps = -torch.rand(2 * PAIRS, T - 1, generator=g, dtype=torch.float64) * 3
    ref_token_logps = -torch.rand(2 * PAIRS, T - 1, generator=g, dtype=torch.float64) * 3
    shift = mask[:, 1:].to(torch.float64)
    return {
        "completion_mask": mask,
        "token_logps": token_logps * shift,
        "logps": (token_logps * shift).sum(1),
        "ref_logps": (ref_token_logps * shift).sum(1),
        "tokens": mask[:, 1:].sum(1),
    }


def _trl_loss(
    loss_type: str, beta: float, b: dict[str, torch.Tensor]
) -> tuple[float, dict[str, list[float]]]:
    """TRL's DPOTrainer._compute_loss on ``b``: the model stand-in returns ``token_logps`` (what TRL's fused LM
    head computes), the reference log-probs come precomputed, as with ``precompute_ref_log_probs``."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = b["token_logps"].shape
    outputs = SimpleNamespace(
        log_probs=b["token_logps"],
        entropy=torch.zeros(n, dtype=torch.float64),
        mean_logits=torch.zeros(n, dtype=torch.float64),
        is_top1=torch.zeros(n, dtype=torch.bool),
    )

    def model(**kwargs: Any) -> SimpleNamespace:
        return outputs

    model.training = True  # type: ignore[attr-defined]
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    ref_c, ref_r = b["ref_logps"].chunk(2)
    trainer = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * PAIRS, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * PAIRS, T, dtype=torch.long),
        "completion_mask": b["completion_mask"],
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), trainer._metrics["train"]


def _ours(kind: str, beta: float, b: dict[str, torch.Tensor]):
    c, r = b["logps"].chunk(2)
    rc, rr = b["ref_logps"].chunk(2)
    nc, nr = b["tokens"].chunk(2)
    out = preference_loss(kind, c, r, rc, rr, chosen_tokens=nc, rejected_tokens=nr, beta=beta)
    return out, out.metrics(c, r)


@pytest.mark.parametrize(("kind", "trl_name"), [("dpo", "sigmoid"), ("ipo", "ipo")])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_and_ipo_equal_trls_loss_code(kind: str, trl_name: str, beta: float, seed: int) -> None:
    pytest.importorskip("trl")
    b = _batch(seed)
    theirs, their_metrics = _trl_loss(trl_name, beta, b)
    out, ours = _ours(kind, beta, b)
    assert float(out.losses.mean()) == pytest.approx(theirs, abs=1e-6)
    for key, their_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("rewards/margin", "rewards/margins"),
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ]:
        assert ours[key] == pytest.approx(their_metrics[their_key][-1], abs=1e-6), key


def test_dpo_by_hand_and_its_gradient_prefers_the_chosen_side() -> None:
    c = torch.tensor([-5.0, -9.0], requires_grad=True)
    r = torch.tensor([-6.0, -4.0], requires_grad=True)
    rc, rr = torch.tensor([-5.5, -8.0]), torch.tensor([-6.0, -5.0])
    n = torch.tensor([3, 3])
    out = preference_loss("dpo", c, r, rc, rr, chosen_tokens=n, rejected_tokens=n, beta=0.5)
    delta = torch.tensor([(-5 + 5.5) - (-6 + 6.0), (-9 + 8) - (-4 + 5)])
    assert out.losses.tolist() == pytest.approx((-F.logsigmoid(0.5 * delta)).tolist())
    assert out.metrics(c, r)["rewards/accuracy"] == 0.5  # pair 0 prefers chosen, pair 1 rejected
    out.losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # descent raises chosen, lowers rejected
    smoothed = preference_loss(
        "dpo", c, r, rc, rr, chosen_tokens=n, rejected_tokens=n, beta=0.5, label_smoothing=0.1
    )
    expect = -0.9 * F.logsigmoid(0.5 * delta) - 0.1 * F.logsigmoid(-0.5 * delta)
    assert smoothed.losses.tolist() == pytest.approx(expect.tolist())


def test_simpo_is_reference_free_and_length_normalized() -> None:
    c, r = torch.tensor([-6.0]), torch.tensor([-6.0])
    out = preference_loss(
        "simpo",
        c,
        r,
        None,
        None,
        chosen_tokens=torch.tensor([3]),
        rejected_tokens=torch.tensor([2]),
        beta=2.0,
        simpo_gamma=0.5,
    )
    # per token: chosen -2, rejected -3 → β·(−2 − −3) − γ = 1.5
    assert float(out.losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    assert float(out.chosen_rewards[0]) == pytest.approx(-4.0) and float(
        out.rejected_rewards[0]
    ) == pytest.approx(-6.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kto"}, "unknown 'kto'; the losses are dpo, ipo, simpo"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"ref": None}, "needs the reference log-probs"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, Any], match: str) -> None:
    x = torch.tensor([-1.0])
    ref = kwargs.pop("ref", x)
    kind = kwargs.pop("kind", "dpo")
    with pytest.raises(ValueError, match=match):
        preference_loss(
            kind, x, x, ref, ref, chosen_tokens=torch.tensor([1]), rejected_tokens=torch.tensor([1]), **kwargs
        )


# ---- the objective: a batch of pairs through the model ------------------------------------------------


def _pair_batch(vocab: int, with_ref: bool) -> dict[str, torch.Tensor]:
    """Two pairs: a shared 4-token prompt, completions of 3 (chosen) and 2-3 (rejected) tokens, labels
    shifted (labels[t] is the target at t) and -100 outside the completions."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (4, 8), generator=g)
    labels = torch.full((4, 8), -100)
    for row, n in enumerate((3, 3, 2, 3)):
        labels[row, 3 : 3 + n] = ids[row, 4 : 4 + n]
    batch = {"input_ids": ids, "labels": labels}
    if with_ref:
        batch["ref_logps"] = torch.tensor([-20.0, -21.0, -19.0, -22.0])
    return batch


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
def test_the_preference_objective_is_the_loss_of_the_models_sequence_logps_plus_aux(kind: str) -> None:
    from moeforge.model.config import load_model_config
    from moeforge.model.transformer import MoETransformer
    from moeforge.train.objectives import build_objective, sequence_logps

    torch.manual_seed(0)
    model = MoETransformer(load_model_config("tiny", ["moe.router_noise_std=0"]))
    batch = _pair_batch(model.cfg.vocab_size, with_ref=kind != "simpo")
    objective = build_objective(kind, torch.device("cpu"), "fp32", document=False, beta=0.2)
    res = objective(model, batch)
    with torch.no_grad():
        out = model(batch["input_ids"])
    logps = sequence_logps(out.logits, batch["labels"])
    tokens = (batch["labels"] != -100).sum(-1)
    ref = batch.get("ref_logps")
    c, r = logps.chunk(2)
    expect = preference_loss(
        kind,
        c,
        r,
        *(ref.chunk(2) if ref is not None else (None, None)),
        chosen_tokens=tokens[:2],
        rejected_tokens=tokens[2:],
        beta=0.2,
    )
    assert out.aux_loss is not None
    assert float(res.loss.detach()) == pytest.approx(float(expect.losses.mean() + out.aux_loss), rel=1e-5)
    assert float(res.scalars["aux_loss"]) == pytest.approx(
        float(out.aux_loss), rel=1e-5
    )  # still applied, logged
    assert set(res.scalars) == set(objective.scalar_names) and res.tokens == 32 and res.moe_stats
    res.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sequence_logps_sums_the_labelled_tokens_only() -> None:
    from moeforge.train.objectives import sequence_logps

    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, -100, 3, -100], [-100, -100, -100, -100]])
    lp = torch.log_softmax(logits, -1)
    assert sequence_logps(logits, labels).tolist() == pytest.approx([float(lp[0, 0, 1] + lp[0, 2, 3]), 0.0])


def test_a_preference_batch_needs_pairs_and_dpo_needs_reference_logps() -> None:
    from moeforge.model.config import load_model_config
    from moeforge.model.transformer import MoETransformer
    from moeforge.train.objectives import build_objective

    model = MoETransformer(load_model_config("tiny", []))
    dpo = build_objective("dpo", torch.device("cpu"), "fp32", document=False)
    batch = _pair_batch(model.cfg.vocab_size, with_ref=False)
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo(model, batch)
    with pytest.raises(ValueError, match="an even count"):
        dpo(model, {k: v[:3] for k, v in batch.items()})
    with pytest.raises(ValueError, match="beta must be > 0"):
        build_objective("ipo", torch.device("cpu"), "fp32", document=False, beta=0.0)
