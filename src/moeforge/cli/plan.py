"""`moeforge model plan`: the parallel layout, memory, communication and time to train a model on N GPUs.

The numbers come from :mod:`moeforge.model.plan`; this module only prints them, as rich tables, JSON or
the markdown of docs/SCALING.md (``make scaling``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moeforge.cli._util import human, parse_count
from moeforge.io import atomic_write_text
from moeforge.model.config import ModelConfig, load_model_config
from moeforge.model.plan import METHOD, Assumptions, Plan, plan
from moeforge.model.sizing import count_params

console = Console()


def plan_cmd(
    model: str = typer.Argument(..., help="Preset name (see `moeforge model list`) or path to a model YAML."),
    gpus: list[int] = typer.Option(
        ..., "--gpus", min=1, help="Number of GPUs; repeat for several plans (--gpus 1024 --gpus 2048)."
    ),
    tokens: str = typer.Option("1T", "--tokens", help="Tokens of the whole training run, e.g. 1T."),
    mfu: float = typer.Option(0.40, "--mfu", help="Share of bf16 peak the kernels reach while computing."),
    global_batch: str = typer.Option(
        "16M",
        "--global-batch",
        help="Global batch in tokens (rounded to a power-of-two number of sequences).",
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", min=1, help="Sequence length (default: max_seq_len)."
    ),
    micro_batch: int = typer.Option(1, "--micro-batch", min=1, help="Sequences per micro-batch."),
    set_: list[str] = typer.Option([], "--set", help="Override a model field, e.g. --set moe.top_k=1."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object; a list for several --gpus)."),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print the docs/SCALING.md text for these plans."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write the JSON or markdown here instead of printing."
    ),
) -> None:
    """Plan training MODEL on --gpus H100s: the fastest TP × EP × PP × DP layout that fits in memory, its
    memory per GPU, expert all-to-all and other traffic per step, step time, tokens/s and days for --tokens.
    Every assumption is printed with the plan."""
    if out is not None and not (as_json or markdown):
        raise ValueError("--out writes the --json or --markdown output; pass one of them")
    cfg = load_model_config(model, set_)
    a = Assumptions(
        mfu=mfu,
        global_batch_tokens=parse_count(global_batch, "--global-batch"),
        seq_len=seq_len,
        micro_batch=micro_batch,
        train_tokens=parse_count(tokens, "--tokens"),
    )
    plans = [plan(cfg, n, a) for n in gpus]
    if as_json:
        data = [p.to_dict() for p in plans]
        text = json.dumps(data[0] if len(data) == 1 else data, indent=2) + "\n"
    elif markdown:
        args = [model, *(f"--gpus {n}" for n in gpus), *(f"--set {s}" for s in set_)]
        for flag, value, default in (
            ("--tokens", tokens, "1T"),
            ("--mfu", mfu, 0.40),
            ("--global-batch", global_batch, "16M"),
            ("--seq-len", seq_len, None),
            ("--micro-batch", micro_batch, 1),
        ):
            if value != default:
                args.append(f"{flag} {value}")
        text = render_markdown(cfg, plans, "moeforge model plan " + " ".join(args) + " --markdown")
    else:
        for p in plans:
            _print_plan(cfg, p)
        return
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        console.print(f"wrote {out}")


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def _s(x: float) -> str:
    return f"{x:,.2f} s"


def _a2a(p: Plan) -> str:
    c = p.comms
    return c.a2a_links if p.layout.ep == 1 else f"{_gb(c.a2a_bytes)} over {c.a2a_links}: {_s(c.a2a_seconds)}"


def _rows(p: Plan) -> dict[str, list[tuple[str, str]]]:
    """The plan as titled (quantity, value) sections, shared by the rich and the markdown output."""
    lay, m, c = p.layout, p.memory, p.comms
    return {
        "layout": [
            ("TP × EP × PP × DP", f"{lay.tp} × {lay.ep} × {lay.pp} × {lay.dp} = {lay.gpus} GPUs"),
            ("activation recompute", lay.recompute),
            (
                "micro-batches per replica per step",
                f"{p.microbatches} of {p.assumptions.micro_batch} × {p.seq_len}",
            ),
            ("pipeline bubble", f"{p.bubble:.1%}"),
        ],
        "memory per GPU": [
            ("weights (bf16)", _gb(m.weights)),
            ("gradients (bf16)", _gb(m.grads)),
            ("fp32 master + Adam (ZeRO-1)", _gb(m.optimizer)),
            ("activations", _gb(m.activations)),
            ("total", f"{_gb(m.total)} of {_gb(m.budget)} usable"),
        ],
        "communication per GPU per step": [
            ("expert all-to-all", _a2a(p)),
            ("tensor parallel (NVLink)", f"{_gb(c.tp_bytes)}: {_s(c.tp_seconds)}"),
            ("data parallel gradients", f"{_gb(c.dp_bytes)} over {c.dp_links}: {_s(c.dp_seconds)}"),
            ("pipeline sends", f"{_gb(c.pp_bytes)}: {_s(c.pp_seconds)}"),
            (
                "exposed (all-to-all / TP / DP)",
                f"{_s(c.a2a_exposed)} / {_s(c.tp_exposed)} / {_s(c.dp_exposed)}",
            ),
        ],
        "time": [
            ("compute per step", _s(p.compute_seconds)),
            ("step", _s(p.step_seconds)),
            ("tokens/s", f"{human(p.tokens_per_second)} ({p.tokens_per_second / p.gpus:,.0f} per GPU)"),
            ("effective MFU", f"{p.effective_mfu:.1%}"),
            (f"days for {human(p.assumptions.train_tokens)} tokens", f"{p.days:.1f}"),
        ],
    }


def _print_plan(cfg: ModelConfig, p: Plan) -> None:
    console.print(f"[bold]{cfg.name}[/] on {p.gpus} × {p.assumptions.gpu}: [bold]{p.layout}[/]")
    for title, rows in _rows(p).items():
        t = Table("quantity", "value", title=title)
        for row in rows:
            t.add_row(*row)
        console.print(t)
    t = Table("name", "value", "meaning", title="assumptions")
    for row in p.assumptions.describe():
        t.add_row(*row)
    console.print(t)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(cfg: ModelConfig, plans: list[Plan], command: str) -> str:
    """docs/SCALING.md: model, summary, assumptions, method, then one section per plan."""
    a, first = plans[0].assumptions, plans[0]
    pc = count_params(cfg)
    moe = cfg.moe
    experts = "dense"
    if moe is not None:
        experts = f"{moe.num_experts} experts top-{moe.top_k}" + (
            f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else ""
        )
    out = [
        f"# Scaling {cfg.name}\n",
        f"<!-- generated by `{command}` (`make scaling`); tests/model/test_plan.py fails when this file "
        "and the command's output differ, so change the code and regenerate, never edit by hand -->\n",
        f"How to train **{cfg.name}** ({human(pc.total)} total / {human(pc.active)} active parameters; "
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.kv_heads} kv), {experts}) "
        f"on {' / '.join(str(p.gpus) for p in plans)} × {a.gpu}: the parallel layout, memory per GPU, "
        f"communication per step, and time for {human(a.train_tokens)} tokens. Training FLOPs per token at "
        f"sequence length {first.seq_len}: {human(first.flops_per_token)} (`moeforge.model.sizing`); "
        f"global batch {first.sequences} × {first.seq_len} = {first.batch_tokens:,} tokens per step.\n",
        "## Summary\n",
        _table(
            [
                "GPUs",
                "layout (TP × EP × PP × DP)",
                "memory / GPU",
                "all-to-all / GPU / step",
                "step",
                "tokens/s",
                "effective MFU",
                f"days for {human(a.train_tokens)} tokens",
            ],
            [
                [
                    str(p.gpus),
                    f"{p.layout.tp} × {p.layout.ep} × {p.layout.pp} × {p.layout.dp}, {p.layout.recompute} recompute",
                    _gb(p.memory.total),
                    _a2a(p),
                    _s(p.step_seconds),
                    human(p.tokens_per_second),
                    f"{p.effective_mfu:.1%}",
                    f"{p.days:.1f}",
                ]
                for p in plans
            ],
        ),
        "## Assumptions\n",
        _table(["name", "value", "meaning"], [[n, f"`{v}`", m] for n, v, m in a.describe()]),
        "## Method\n",
        "".join(f"- {line}\n" for line in METHOD),
    ]
    for p in plans:
        out.append(f"## {p.gpus} × {a.gpu}\n")
        for title, rows in _rows(p).items():
            out.append(f"### {title[0].upper()}{title[1:]}\n")
            out.append(_table(["quantity", "value"], [list(r) for r in rows]))
        if p.alternatives:
            out.append("### Runners-up\n")
            out.append(
                _table(
                    ["layout", "step", "memory / GPU", "expert all-to-all / GPU / step"],
                    [
                        [str(q.layout), _s(q.step_seconds), _gb(q.memory.total), _a2a(q)]
                        for q in p.alternatives
                    ],
                )
            )
    return "\n".join(out)
