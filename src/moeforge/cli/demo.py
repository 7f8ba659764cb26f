"""`moeforge demo`: data → tokenizer → shards → a tiny MoE trained and evaluated, no downloads."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars, train_fields

console = Console()


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where every stage writes."),
    quick: bool = typer.Option(False, "--quick", help="A smaller tokenizer and 60 training steps (~2 min)."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Processes for the data pipeline."),
) -> None:
    """The whole flow on built-in data: recipe → records → tokenizer → token shards → train → eval → charts."""
    from moeforge.demo import run_demo

    with Bars(console, transient=True) as bars:

        def progress(step: int, total: int, scalars: dict[str, float]) -> None:
            bars.update("train", "train", step, total, **train_fields(scalars))

        res = run_demo(out, quick=quick, workers=workers, notify=lambda s: console.print(f"[cyan]{s}[/]"),
                       train_progress=progress)  # fmt: skip
    s = res.summary
    t = s["train"]
    table = Table(title="moeforge demo")
    table.add_column("")
    table.add_column("value", overflow="fold")
    rec = s["data"]["records"]
    table.add_row("records", f"train {rec['train']:,} · valid {rec['valid']:,} · test {rec['test']:,}")
    table.add_row("gates", ", ".join(f"{k} {v}" for k, v in s["data"]["gates"].items()))
    eff = s["tokens"]["train"]
    table.add_row(
        "train tokens",
        f"{eff['tokens']:,} in {eff['samples']:,} blocks ({100 * eff['packing_efficiency']:.1f}% packed)",
    )
    table.add_row("model", f"tiny MoE: {t['params_total']:,} params, {t['params_active']:,} active per token")
    table.add_row("training", f"{t['steps']} steps, {t['tokens_seen']:,} tokens, status {t['status']}")
    if t.get("best_valid_loss") is not None:
        table.add_row("best valid loss", f"{t['best_valid_loss']:.4f}")
    test = t.get("test") or {}
    for k in sorted(test):
        if k.startswith("loss"):
            table.add_row(f"test {k}", f"{test[k]:.4f}")
    held = s.get("heldout_lm_eval")
    if held:
        table.add_row(
            "held-out (lm-eval)",
            f"{held['bits_per_byte']:.3f} bits/byte, byte perplexity {held['byte_perplexity']:.2f} on "
            f"{int(held['documents'])} test records (moeforge_heldout, as `moeforge eval` scores)",
        )
    table.add_row("collapse events", str(len(t.get("collapse_events") or [])))
    for name, path in res.files.items():
        table.add_row(name, escape(str(path)))
    console.print(table)
    more = f"--set out_dir={res.out / 'train'} --set data.tokens={res.out / 'tokens'}"
    console.print(
        f"next: [bold]moeforge train configs/train/demo.yaml --resume {escape(more)} --set steps=800[/] "
        "continues this run to 800 steps, "
        f"or inspect {escape(str(res.out / 'data' / 'report.html'))} and {escape(str(res.out / 'loss.png'))}"
    )
