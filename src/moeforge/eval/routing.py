"""Which experts serve which domains: per-token routing decisions collected over evaluation batches.

The affinity of layer L is a matrix ``[E, D]``: entry ``(e, d)`` is the share of domain ``d``'s
token→expert assignments that went to expert ``e`` (each column sums to 1). A uniform column means the
layer does not tell the domain apart; a column concentrated on a few experts means those experts
specialized in it. Padding positions (``doc_ids == -1``) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from moeforge.model.moe import MoELayer
from moeforge.model.router import RouterOutput
from moeforge.model.transformer import MoETransformer

__all__ = ["expert_domain_affinity", "specialization"]


@torch.no_grad()
def expert_domain_affinity(
    model: MoETransformer,
    batches: Iterable[dict[str, torch.Tensor]],
    num_domains: int,
    *,
    device: torch.device | str = "cpu",
    document: bool = True,
    forward: Callable[[dict[str, torch.Tensor]], object] | None = None,
) -> dict[int, np.ndarray]:
    """Layer index → ``[E, D]`` assignment shares (columns sum to 1; a domain never seen is all zeros).
    ``forward`` runs the model on one batch instead of ``model(input_ids, …)`` (e.g. from cached hidden
    states over a frozen trunk)."""
    layers = {b.index: b.mlp for b in model.blocks if isinstance(b.mlp, MoELayer)}
    counts = {i: np.zeros((m.router.weight.shape[0], num_domains)) for i, m in layers.items()}
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, m in layers.items():

        def hook(_mod: torch.nn.Module, _inp: object, out: RouterOutput, i: int = i) -> None:
            captured[i] = out.indices

        hooks.append(m.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            kw = {}
            if forward is not None:
                forward(batch)
            elif document:
                kw = {
                    "doc_ids_BT": batch["doc_ids"].to(device),
                    "positions_BT": batch["positions"].to(device),
                }
            if forward is None:
                model(ids, **kw)
            T = ids.shape[1]
            real = (batch["doc_ids"] >= 0).reshape(-1).cpu().numpy()
            dom = np.repeat(batch["domain"].cpu().numpy(), T)[real]
            for i, idx in captured.items():
                chosen = idx.cpu().numpy()[real]  # [N_real, k]
                for j in range(chosen.shape[1]):
                    np.add.at(counts[i], (chosen[:, j], dom), 1.0)
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for i, c in counts.items():
        totals = c.sum(0, keepdims=True)
        out[i] = np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)
    return out


def specialization(affinity: np.ndarray) -> float:
    """How far a layer's columns are from uniform: mean over domains of total variation distance
    between the domain's expert distribution and the average one (0 = no specialization)."""
    seen = affinity[:, affinity.sum(0) > 0]
    if seen.shape[1] < 2:
        return 0.0
    mean = seen.mean(1, keepdims=True)
    return float(0.5 * np.abs(seen - mean).sum(0).mean())
