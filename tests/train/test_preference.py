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
