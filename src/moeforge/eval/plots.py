"""PNG charts for runs and experiments (matplotlib, headless Agg backend): loss curves, routing loads over
training, expert × domain heatmaps. Every function writes one file atomically and returns its path."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.io import atomic_write_bytes

__all__ = ["affinity_heatmaps", "load_metrics", "loss_curves", "routing_load_curves", "stage_curves"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    # fixed metadata: the same data gives the same PNG bytes
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (torn lines skipped)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def loss_curves(
    runs: Mapping[str, Sequence[dict[str, Any]]],
    path: Path,
    *,
    title: str = "loss",
    per_domain: bool = False,
    note: str | None = None,
) -> Path:
    """Train loss (thin) and validation loss (markers) per step, one colour per run. ``per_domain`` adds
    each domain's validation loss (dashed) for every run: when the splits' domain mixes differ, only
    those are comparable across splits. ``note`` is printed under the axes (the reason, the mixes)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6 if note else 4))
    for k, (name, rows) in enumerate(runs.items()):
        colour = f"C{k}"
        tr = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
        va = [(r["step"], r["loss"]) for r in rows if r.get("split") == "valid" and r.get("loss") is not None]
        if tr:
            ax.plot(*zip(*tr, strict=True), color=colour, alpha=0.45, lw=1, label=f"{name} train")
        if va:
            ax.plot(*zip(*va, strict=True), color=colour, marker="o", ms=3, lw=1.5, label=f"{name} valid")
        if per_domain:
            domains = sorted(
                {
                    k.split("/", 1)[1]
                    for r in rows
                    if r.get("split") == "valid"
                    for k in r
                    if k.startswith("loss/")
                }
            )
            for j, dom in enumerate(domains):
                pts = [
                    (r["step"], r[f"loss/{dom}"])
                    for r in rows
                    if r.get("split") == "valid" and f"loss/{dom}" in r
                ]
                ax.plot(
                    *zip(*pts, strict=True), color=f"C{k + 1 + j}", ls="--", lw=1, label=f"{name} valid {dom}"
                )
    if note:
        fig.text(0.01, 0.01, note, fontsize=6.5, va="bottom", wrap=True)
        fig.subplots_adjust(bottom=0.27)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def stage_curves(
    stages: Sequence[tuple[str, int, Sequence[dict[str, Any]]]], path: Path, *, title: str = "loss"
) -> Path:
    """Train loss (thin) and validation loss (markers) of consecutive training stages on one step axis:
    ``stages`` is ``(name, first step, metric rows)`` each, a dotted line marks where each begins."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (name, offset, rows) in enumerate(stages):
        for split, style in (
            ("train", {"alpha": 0.5, "lw": 1}),
            ("valid", {"marker": "o", "ms": 3, "lw": 1.5}),
        ):
            pts = [
                (offset + r["step"], r["loss"])
                for r in rows
                if r.get("split") == split and r.get("loss") is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=f"C{k}", label=f"{name} {split}", **style)
        ax.axvline(offset, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("loss (LM: nats/token; preference: its own loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def routing_load_curves(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    title: str = "largest expert load",
    balanced: float | None = None,
) -> Path:
    """Per MoE layer, the largest expert's token share over training (the collapse detector's signal);
    ``balanced`` (top_k / experts, the share of every expert when routing is even) is drawn as a dashed
    line, so a reader sees how far from even the routing is."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    train = [r for r in rows if r.get("split") == "train"]
    layers = sorted(
        {k.split("/")[1] for r in train for k in r if k.startswith("moe/L") and k.endswith("/load_max")}
    )
    for name in layers:
        pts = [(r["step"], r[f"moe/{name}/load_max"]) for r in train if f"moe/{name}/load_max" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
    if balanced is not None:
        ax.axhline(balanced, color="0.4", linestyle="--", linewidth=1, label=f"balanced ({balanced:.3g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max token share")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if layers or balanced is not None:
        ax.legend(fontsize=7, ncol=4)
    return _save(fig, path)


def affinity_heatmaps(
    affinity: Mapping[int, np.ndarray], domains: Sequence[str], path: Path, *, title: str = "expert × domain"
) -> Path:
    """One heatmap per MoE layer: share of each domain's assignments per expert."""
    plt = _plt()
    n = max(len(affinity), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 1.6 * n, 3.2), squeeze=False)
    for ax, (layer, mat) in zip(axes[0], sorted(affinity.items()), strict=False):
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(mat.max()), 1e-9))
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks(range(len(domains)), domains, rotation=45, fontsize=7)
        ax.set_yticks(range(mat.shape[0]), [f"e{i}" for i in range(mat.shape[0])], fontsize=7)
        for (e, d), v in np.ndenumerate(mat):
            ax.text(
                d,
                e,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if v < 0.6 * mat.max() else "k",
            )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
