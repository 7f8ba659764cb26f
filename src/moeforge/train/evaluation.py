"""Evaluation: valid/test loss and perplexity, overall and per domain, and the eval batches.

Forwards go through the same :func:`~moeforge.train.objectives.autocast` and
:func:`~moeforge.train.objectives.model_inputs` as the training objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from moeforge.model.transformer import MoETransformer
from moeforge.tokens.loader import TokenDataset, build_batch
from moeforge.train import fsdp
from moeforge.train.distributed import DistInfo, all_reduce_sum_tensor
from moeforge.train.expert_parallel import is_expert_parallel
from moeforge.train.objectives import autocast, model_inputs

__all__ = ["eval_batches", "evaluate"]


def eval_batches(
    ds: TokenDataset, batch_size: int, *, max_batches: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of an evaluation pass over ``ds``: every sample, or with ``max_batches`` an evenly
    spaced subset of ``max_batches × batch_size × world_size`` samples (samples are stored domain by
    domain, so taking the first ones would evaluate one domain only). Deterministic."""
    n = len(ds)
    if max_batches is not None and max_batches * batch_size * world_size < n:
        idx = np.linspace(0, n - 1, max_batches * batch_size * world_size).round().astype(np.int64)
    else:
        idx = np.arange(n, dtype=np.int64)
    mine = idx[rank::world_size]
    for a in range(0, len(mine), batch_size):
        part = mine[a : a + batch_size]
        yield build_batch([ds], np.zeros(len(part), np.int64), part, ds.seq_len)


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    batches: Iterable[dict[str, torch.Tensor]],
    domains: list[str],
    *,
    device: torch.device,
    precision: str = "auto",
    document: bool = True,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """Token-weighted loss and perplexity over ``batches``, overall and per domain (``loss``, ``ppl``,
    ``loss/<domain>``, ``ppl/<domain>``, ``tokens``). Eval forwards change nothing: the model is in eval
    mode (no router noise, no aux-free bias or ghost updates)."""
    was_training = model.training
    model.eval()
    n_dom = len(domains)
    # per domain: summed token loss, token count; float64 on the device (no host sync per batch), read once
    # at the end. MPS has no float64: there the sums stay on the host, as the numbers need.
    acc_dev = torch.device("cpu") if device.type == "mps" else device
    sums_2D = torch.zeros((2, n_dom), dtype=torch.float64, device=acc_dev)
    # a forward that is a collective (FSDP's all-gathers, expert parallelism's all-to-all) needs every
    # process to run as many forwards as the others
    sharded = info is not None and info.enabled and (fsdp.is_sharded(model) or is_expert_parallel(model))
    for batch in fsdp.lockstep(batches, info.device) if sharded and info is not None else batches:
        if batch is None:  # out of batches: a forward as long as the other processes run theirs
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
            continue
        ids = batch["input_ids"].to(device)
        with autocast(device, precision):
            kw = model_inputs(batch, device, document)
            labels = kw.pop("labels_BT")
            out = model(ids, **kw)
        tok_loss = F.cross_entropy(
            out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )  # [B, T]
        valid = (labels != -100).to(torch.float64)
        per_row = (tok_loss.double() * valid).sum(1).to(acc_dev)
        per_row_n = valid.sum(1).to(acc_dev)
        dom = batch["domain"].long().to(acc_dev)
        sums_2D[0].index_add_(0, dom, per_row)
        sums_2D[1].index_add_(0, dom, per_row_n)
    if info is not None:
        sums_2D = all_reduce_sum_tensor(sums_2D, info)  # one collective, on the process's device
    sums, counts = sums_2D.cpu()  # the one host read
    model.train(was_training)
    total_n = float(counts.sum())
    res: dict[str, float] = {"tokens": total_n}
    if total_n > 0:
        loss = float(sums.sum()) / total_n
        res.update(loss=loss, ppl=math.exp(min(loss, 50.0)))
    for d, name in enumerate(domains):
        if counts[d] > 0:
            dl = float(sums[d] / counts[d])
            res[f"loss/{name}"] = dl
            res[f"ppl/{name}"] = math.exp(min(dl, 50.0))
    return res
