"""Training objectives: what one micro-batch's loss is, behind one small interface.

An :class:`Objective` takes the (possibly DDP-wrapped) model and one micro-batch from the loader and
returns an :class:`ObjectiveOutput`: the tensor to backpropagate, the scalars to log (detached, keyed by
their metric names) and the MoE routing statistics of the forward. The trainer owns everything around
it — gradient accumulation, DDP's ``no_sync``, clipping, the optimizer and router steps — so a new
objective (a preference loss, a distillation loss) is one class here and one name in
:func:`build_objective`; the loop does not change.

:class:`LanguageModeling` is today's objective: next-token cross-entropy plus the model's MoE auxiliary
losses (``lb_coef·LB + z_coef·Z``, already summed over layers by the model). Its scalars are ``loss`` (the
LM part) and ``aux_loss``.

:func:`autocast` and :func:`model_inputs` are the two pieces every forward on a loader batch shares — the
training step here and :func:`moeforge.train.evaluation.evaluate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from moeforge.model.moe import MoEStats

__all__ = [
    "LanguageModeling",
    "Objective",
    "ObjectiveOutput",
    "Preference",
    "autocast",
    "build_objective",
    "model_inputs",
    "sequence_logps",
]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision: bf16`` (or ``auto`` on CUDA); nothing otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, document: bool) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a loader batch: the labels and, with document
    attention, each token's document id and position within its document."""
    kw: dict[str, Any] = {"labels_BT": batch["labels"].to(device)}
    if document:
        kw["doc_ids_BT"] = batch["doc_ids"].to(device)
        kw["positions_BT"] = batch["positions"].to(device)
    return kw


@dataclass
class ObjectiveOutput:
    """One micro-batch's result. ``loss`` is what backward sees (before the trainer divides it by the
    accumulation steps); ``scalars`` are detached 0-d tensors, averaged over the step's micro-batches and
    logged under their keys; ``tokens`` counts the input tokens (throughput, ``tokens_seen``)."""

    loss: torch.Tensor
    scalars: dict[str, torch.Tensor]
    tokens: int
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)


class Objective(Protocol):
    """What the trainer asks of a loss. ``scalar_names`` lists the keys of every output's ``scalars`` in
    the order they are logged."""

    name: str
    scalar_names: tuple[str, ...]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput: ...


class LanguageModeling:
    """Next-token cross-entropy + the MoE auxiliary losses (see the module docstring)."""

    name = "lm"
    scalar_names = ("loss", "aux_loss")

    def __init__(self, device: torch.device, precision: str, *, document: bool) -> None:
        self.device = device
        self.precision = precision
        self.document = document

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        ids = batch["input_ids"].to(self.device)
        with autocast(self.device, self.precision):
            out = model(ids, **model_inputs(batch, self.device, self.document))
        lm = out.loss
        if lm is None:
            raise RuntimeError("the model returned no loss: the batch carries no labels")
        aux = out.aux_loss
        total = lm + aux if aux is not None else lm
        scalars = {
            "loss": lm.detach(),
            "aux_loss": aux.detach() if aux is not None else torch.zeros((), device=lm.device),
        }
        return ObjectiveOutput(total, scalars, int(ids.numel()), out.moe_stats)


def sequence_logps(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``[B]``: each row's summed log-probability of its labelled tokens (``labels[t]`` is the target at
    position ``t``, already shifted, as the model's own loss takes them), log-softmax in float32."""
    mask = labels_BT != ignore_index
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    picked = logp.gather(-1, labels_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


class Preference:
    """A preference objective (:mod:`moeforge.train.preference`: ``dpo``, ``ipo``, ``simpo``) plus the MoE
    auxiliary losses, on a batch of pairs laid out as ``P`` chosen rows then ``P`` rejected rows:
    ``input_ids`` and ``labels`` ``[2P, T]`` (labels −100 outside the completion) and, for DPO and IPO,
    ``ref_logps`` ``[2P]`` — the reference model's :func:`sequence_logps`, computed once into a cache
    rather than by a second model at every step. ``nll_coef`` > 0 adds the chosen answers' per-token NLL
    times it (RPO; TRL's ``rpo_alpha``), which keeps the chosen answers likely instead of only relatively
    likelier. Its scalars are the preference metrics, ``nll/chosen`` and ``aux_loss``."""

    name = "preference"
    scalar_names = (
        "loss",
        "aux_loss",
        "rewards/accuracy",
        "rewards/margin",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "nll/chosen",
    )

    def __init__(
        self,
        kind: str,
        device: torch.device,
        precision: str,
        *,
        beta: float = 0.1,
        simpo_gamma: float = 0.5,
        nll_coef: float = 0.0,
    ) -> None:
        from moeforge.train.preference import check_settings, preference_loss

        check_settings(kind, beta)
        self.kind = kind
        self.device = device
        self.precision = precision
        self.beta = beta
        self.simpo_gamma = simpo_gamma
        self.nll_coef = nll_coef
        self._loss = preference_loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        if ids.shape[0] % 2:
            raise ValueError(
                f"a preference batch has chosen then rejected rows: an even count (got {ids.shape[0]})"
            )
        with autocast(self.device, self.precision):
            out = model(ids)
        logps = sequence_logps(out.logits, labels)
        tokens = (labels != -100).sum(-1)
        c, r = logps.chunk(2)
        nc, nr = tokens.chunk(2)
        ref = batch.get("ref_logps")
        rc, rr = ref.to(self.device).to(logps.dtype).chunk(2) if ref is not None else (None, None)
        pref = self._loss(
            self.kind,
            c,
            r,
            rc,
            rr,
            chosen_tokens=nc,
            rejected_tokens=nr,
            beta=self.beta,
            simpo_gamma=self.simpo_gamma,
        )
        aux = out.aux_loss
        nll = -(c / nc.clamp(min=1)).mean()  # the chosen answers' per-token NLL (RPO's term)
        loss = pref.losses.mean() + (aux if aux is not None else 0.0)
        if self.nll_coef:
            loss = loss + self.nll_coef * nll
        m = pref.metrics(c, r)
        scalars = {k: torch.tensor(m[k]) for k in self.scalar_names if k in m}
        scalars["nll/chosen"] = nll.detach()
        scalars["aux_loss"] = aux.detach() if aux is not None else torch.zeros(())
        return ObjectiveOutput(loss, scalars, int(ids.numel()), out.moe_stats)


def build_objective(
    name: str,
    device: torch.device,
    precision: str,
    *,
    document: bool,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    nll_coef: float = 0.0,
) -> Objective:
    """The objective a training config names: ``lm`` (language modeling), or a preference loss ``dpo``,
    ``ipo``, ``simpo`` (:class:`Preference`)."""
    if name == "lm":
        return LanguageModeling(device, precision, document=document)
    if name in ("dpo", "ipo", "simpo"):
        return Preference(name, device, precision, beta=beta, simpo_gamma=simpo_gamma, nll_coef=nll_coef)
    raise ValueError(f"objective: unknown {name!r}; the objectives are: lm, dpo, ipo, simpo")
