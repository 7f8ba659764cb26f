"""`moeforge experiment …`: reproducible experiments that train several runs and write a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars, train_fields

app = typer.Typer(
    help="Experiments: several training runs compared in one report.",
    no_args_is_help=True,
)
console = Console()


@app.callback()
def _group() -> None:
    """Experiments: several training runs compared in one report."""


@app.command("emergence")
def emergence(
    config: Path = typer.Argument(
        ..., metavar="CONFIG", help="Experiment YAML, e.g. configs/experiments/emergence-tiny.yaml."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (overrides out_dir)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config value: key.path=value (repeatable), e.g. real_data=true."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="The config's test-sized version (its quick: section)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Retrain every run, even completed identical ones."),
) -> None:
    """Dense vs MoE top-1 (LB + z loss, annealed noise) vs MoE without LB vs MoE top-2 on code / math /
    prose with one token budget, each variant over its seeds; writes report.md, results.json and charts."""
    from moeforge.eval.emergence_config import load_emergence_config
    from moeforge.eval.experiments import run_emergence

    sets = [*overrides, *([f"out_dir={out}"] if out is not None else [])]
    cfg = load_emergence_config(config, sets, quick=quick)
    with Bars(console) as bars:

        def progress(name: str, step: int, total: int, scalars: dict[str, float]) -> None:
            fields = train_fields(scalars) if "loss" in scalars else {"_reused": "reused"}
            bars.update(name, f"{name:<16}", step, total, **fields)

        res = run_emergence(
            cfg, progress=progress, notify=lambda s: bars.print(f"[cyan]{escape(s)}[/]"), fresh=fresh
        )
    r = res.results
    domains: list[str] = r["domains"]
    table = Table(
        title=f"{escape(r['name'])}: {r['settings']['tokens_per_run']:,} training tokens per run, "
        "test loss mean ± std over seeds"
    )
    for col in (
        "variant",
        "seeds",
        "active",
        "total",
        "test loss",
        *(f"test {d}" for d in domains),
        "Δ vs dense",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")
    table.add_column("peak load", justify="right")
    table.add_column("collapsed seeds", justify="right")

    def ms(st: dict[str, Any] | None) -> str:
        if st is None:
            return "—"
        return f"{st['mean']:.4f}" if st["n"] == 1 else f"{st['mean']:.4f} ± {st['std']:.4f}"

    for a in r["variants"]:
        test = a.get("test") or {}
        peaks = [
            run["routing"]["load_max_peak"]
            for run in r["runs"]
            if run["role"] == a["role"] and run.get("routing")
        ]
        delta = a.get("delta_vs_dense_pct")
        table.add_row(
            f"{escape(a['name'])} [dim]({a['role']})[/]",
            ", ".join(map(str, a["seeds"])),
            f"{a['params_active']:,}",
            f"{a['params_total']:,}",
            ms(test.get("loss")),
            *(ms(test.get(f"loss/{d}")) for d in domains),
            "—" if a["role"] == "dense" or delta is None else f"{delta:+.2f}%",
            f"{100 * max(peaks):.1f}%" if peaks else "—",
            (", ".join(map(str, a["collapsed_seeds"])) or "none") if peaks else "—",
        )
    console.print(table)
    colour = {"held": "green", "did not hold": "red", "inconclusive": "yellow", "not measured": "yellow"}
    for f in r["findings"]:
        console.print(f"[bold {colour[f['verdict']]}]{f['verdict']}[/]: {escape(f['claim'])}")
    env = r["environment"]
    console.print(
        f"wall time {env['wall_seconds'] / 60:.1f} min · load average {env['loadavg_start']} → "
        f"{env['loadavg_end']}"
    )
    console.print(f"report: [bold]{escape(str(res.report))}[/]")


@app.command("upcycled")
def upcycled(
    config: Path = typer.Argument(
        ..., metavar="CONFIG", help="Study YAML, e.g. configs/experiments/emergence-upcycled.yaml."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (overrides out_dir)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value: key.path=value."),
    quick: bool = typer.Option(
        False, "--quick", help="The config's test-sized version (its quick: section)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Retrain every run, even finished identical ones."),
) -> None:
    """The emergence study on a real pretrained model: SmolLM2-135M's last blocks fine-tuned dense vs
    upcycled into MoE (top-1 with LB, without LB, top-2) over a frozen, cached trunk, several seeds;
    writes report.md and results.json with verdicts derived from the numbers."""
    from moeforge.eval.upcycled import load_study_config, run_upcycled_study

    cfg = load_study_config(config, overrides, quick=quick)
    if out is not None:
        cfg = cfg.model_copy(update={"out_dir": str(out)})
    report = run_upcycled_study(cfg, fresh=fresh)
    console.print(report.read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"report: {escape(str(report))}")
