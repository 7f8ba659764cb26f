"""`moeforge model …`: inspect presets, size models, scale them down, solve dims for a target size."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from moeforge.cli._util import human, human_bytes, parse_count
from moeforge.io import atomic_write_text
from moeforge.model.config import ModelConfig, list_presets, load_model_config
from moeforge.model.sizing import count_params, mini_config, solve_dims, summarize

app = typer.Typer(help="Model presets and sizing: info, list, mini, solve.", no_args_is_help=True)
console = Console()


@app.command("list")
def list_cmd() -> None:
    """List the model presets (configs/models/*.yaml) with their total and active parameters."""
    table = Table("preset", "layers", "d_model", "experts", "total", "active")
    for name in list_presets():
        cfg = load_model_config(name)
        p = count_params(cfg)
        experts = f"{cfg.moe.num_experts} top-{cfg.moe.top_k}" if cfg.moe else "dense"
        table.add_row(name, str(cfg.n_layers), str(cfg.d_model), experts, human(p.total), human(p.active))
    console.print(table)


@app.command("info")
def info(
    model: str = typer.Argument(..., help="Preset name (see `moeforge model list`) or path to a model YAML."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a field, e.g. --set moe.top_k=1 (repeatable)."
    ),
    seq_len: int | None = typer.Option(
        None, min=1, help="Sequence length for FLOPs and memory (default: max_seq_len)."
    ),
    micro_batch: int = typer.Option(1, min=1, help="Micro-batch size for the activation-memory estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Exact parameter counts, FLOPs per token, memory and the GPUs needed to train MODEL."""
    cfg = load_model_config(model, set_)
    s = summarize(cfg, micro_batch=micro_batch, seq_len=seq_len)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    p, f, m = s["params"], s["flops"], s["memory"]
    assert isinstance(p, dict) and isinstance(f, dict) and isinstance(m, dict)
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.kv_heads} kv), vocab {cfg.vocab_size}, context {cfg.max_seq_len}"
    )
    t = Table("component", "parameters", title="parameters")
    for key in (
        "embedding",
        "head",
        "attention",
        "norms",
        "dense_mlp",
        "router",
        "shared_experts",
        "experts",
    ):
        t.add_row(key, f"{p[key]:,}")
    t.add_row("[bold]total[/]", f"[bold]{p['total']:,}[/] ({human(p['total'])})")
    t.add_row("[bold]active per token[/]", f"[bold]{p['active']:,}[/] ({human(p['active'])})")
    console.print(t)
    t = Table(
        "quantity",
        "value",
        title=f"compute and memory (seq {m['seq_len']}, micro-batch {m['micro_batch']}, {m['dtype']})",
    )
    t.add_row("forward FLOPs / token", f"{human(f['forward'])} (attention {human(f['forward_attention'])})")
    t.add_row("training FLOPs / token", human(f["training"]))
    t.add_row("weights", human_bytes(m["weights"]))
    t.add_row("grads + optimizer states", human_bytes(m["grads"] + m["optimizer"]))
    t.add_row("activations (no checkpointing)", human_bytes(m["activations"]))
    t.add_row("activations (full checkpointing)", human_bytes(m["activations_checkpointed"]))
    t.add_row("KV cache per token", human_bytes(m["kv_cache_per_token"]))
    gpus = m["min_gpus_80gb"]
    t.add_row(
        "min 80 GB GPUs to train (FSDP + EP)",
        str(gpus) if gpus > 0 else "does not fit: activations exceed one GPU",
    )
    console.print(t)


def _emit(cfg: ModelConfig, out: Path | None, header: str) -> None:
    text = header + yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        console.print(f"wrote {out}")


@app.command("mini")
def mini(
    model: str = typer.Argument(..., help="Preset name or YAML path to scale down."),
    params: str = typer.Option(..., "--params", help="Target total parameters, e.g. 5M."),
    vocab: int | None = typer.Option(
        None, "--vocab", help="Use this vocabulary size instead of the preset's."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the YAML here instead of printing it."),
) -> None:
    """Scale a preset down to about --params parameters, keeping its architecture."""
    base = load_model_config(model)
    cfg = mini_config(base, parse_count(params, "--params"), vocab)
    p = count_params(cfg)
    _emit(
        cfg, out, f"# {cfg.name}: {base.name} scaled to {p.total:,} total / {p.active:,} active parameters\n"
    )


@app.command("solve")
def solve(
    total: str = typer.Option(..., "--total", help="Target total parameters, e.g. 850B."),
    active: str = typer.Option(..., "--active", help="Target active parameters per token, e.g. 120B."),
    experts: int = typer.Option(..., "--experts", min=2, help="Routed experts per MoE layer."),
    top_k: int = typer.Option(..., "--top-k", min=1, help="Experts per token."),
    vocab: int = typer.Option(65536, "--vocab", help="Vocabulary size."),
    context: int = typer.Option(8192, "--context", help="max_seq_len of the proposed config."),
    out: Path | None = typer.Option(None, "--out", help="Write the YAML here instead of printing it."),
) -> None:
    """Propose model dims that hit --total and --active exactly, and show the derivation."""
    cfg, notes = solve_dims(
        parse_count(total, "--total"),
        parse_count(active, "--active"),
        experts,
        top_k,
        vocab,
        max_seq_len=context,
    )
    header = "".join(f"# {line}\n" for line in notes)
    _emit(cfg, out, header)
