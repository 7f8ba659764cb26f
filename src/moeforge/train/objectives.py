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
    "autocast",
    "build_objective",
    "model_inputs",
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


def build_objective(name: str, device: torch.device, precision: str, *, document: bool) -> Objective:
    """The objective a training config names (``objective:``; today only ``lm``)."""
    if name == "lm":
        return LanguageModeling(device, precision, document=document)
    raise ValueError(f"objective: unknown {name!r}; the objectives are: lm")
