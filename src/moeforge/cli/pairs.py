"""`moeforge data pairs …`: preference pair sets — import them from files, or generate them from a checkpoint."""

from __future__ import annotations

import time
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars, clock, rate
from moeforge.cli._util import EXIT_GATES_FAILED, gate_table

app = typer.Typer(
    help="Preference pairs (chosen vs rejected replies to one prompt) for DPO/IPO/SimPO: import or generate "
    "a pair set — cleaned, split by prompt, gated, written with a manifest.",
    no_args_is_help=True,
)
console = Console()


class Layout(StrEnum):
    auto = "auto"
    standard = "standard"
    conversational = "conversational"
    hh = "hh"


def _family_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or "pairs"


def print_pair_set(manifest: dict[str, Any], out: Path) -> bool:
    """Print a pair set's summary (pairs per split, drops and quarantine by reason, the gates); True when
    every gate passes."""
    counts = manifest["counts"]
    splits = Table(title=f"pair set → {escape(str(out))}")
    for col in ("split", "pairs", "prompts", "chosen/rejected length", "chosen longer"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, stats in manifest["splits"].items():
        ratio, longer = stats["length_ratio_mean"], stats["chosen_longer_share"]
        splits.add_row(
            name,
            str(stats["pairs"]),
            str(stats["prompts"]),
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if longer is None else f"{longer:.0%}",
        )
    console.print(splits)
    if counts["reasons"]:
        reasons = Table(title=f"dropped {counts['dropped']}, quarantined {counts['quarantined']}")
        reasons.add_column("reason")
        reasons.add_column("items", justify="right")
        for reason, n in counts["reasons"].items():
            reasons.add_row(escape(reason), str(n))
        console.print(reasons)
    console.print(gate_table(manifest["gates"]))
    passed = all(g["passed"] for g in manifest["gates"])
    if not passed:
        console.print("[bold red]a gate failed[/]: see the table (the pair set is written all the same)")
    return passed


@app.command("import")
def import_pairs(
    sources: list[str] = typer.Argument(
        ..., metavar="SOURCE...", help="Files, directories or globs: jsonl, json, csv or parquet."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Pair set directory to write."),
    layout: Layout = typer.Option(
        Layout.auto, "--layout", help="Expected layout; items read as another one are quarantined."
    ),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Field holding the prompt."),
    chosen_field: str = typer.Option("chosen", "--chosen-field", help="Field holding the chosen side."),
    rejected_field: str = typer.Option(
        "rejected", "--rejected-field", help="Field holding the rejected side."
    ),
    family: str | None = typer.Option(
        None, "--family", help="Dataset family of every pair (default: each file's name up to the first dot)."
    ),
    domain: str = typer.Option("chat", "--domain", help="Domain of every pair: chat, math, code …"),
    config: Path | None = typer.Option(
        None, "--config", help="Pair set settings YAML (split, near_dup, pii, decontamination, gates)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Import preference pairs from files into a pair set.

    Reads TRL's standard layout (prompt/chosen/rejected strings), its conversational one (lists of turns,
    UltraFeedback's full conversations included) and Anthropic HH transcripts; items that are not pairs are
    quarantined with the reason. Then scrubs PII, decontaminates, drops duplicate and contradicting pairs,
    splits by prompt and runs the gates (see moeforge.data.pairset).

    Exit codes: 0 all gates pass; 1 a gate failed; 2 a usage or input error.
    """
    from moeforge.config import load_yaml_config
    from moeforge.data.contract import Provenance, RecordMeta, SourceRef
    from moeforge.data.pairset import PairSetConfig, write_pair_set
    from moeforge.data.preference import PairProblem, pair_from_item
    from moeforge.data.sources import Quarantined, SourceError, expand_inputs, read_source
    from moeforge.io import sha256_file

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    cfg = load_yaml_config(PairSetConfig, config) if config is not None else PairSetConfig()
    try:  # every path checked before any reading
        files = [f for spec in sources for f in expand_inputs(spec)]
    except SourceError as exc:
        raise SourceError(str(exc).replace("the path in the recipe", "the SOURCE argument")) from None
    shas = {f: sha256_file(f) for f in files}
    pairs, quarantined = [], []
    read: Counter[str] = Counter()
    for spec in sources:
        for item in read_source(spec):
            if isinstance(item, Quarantined):
                quarantined.append(item)
                continue
            read[item.uri] += 1

            def meta(_data: dict[str, Any], item: Any = item) -> RecordMeta:
                return RecordMeta(
                    source=SourceRef(uri=item.uri, line=item.line, offset=item.offset),
                    family=family or _family_of(item.uri),
                    domain=domain,
                    provenance=Provenance(source_sha256=shas[item.uri], steps=["pairs:import"]),
                )

            got = pair_from_item(
                item.data,
                meta_factory=meta,
                prompt_field=prompt_field,
                chosen_field=chosen_field,
                rejected_field=rejected_field,
            )
            if not isinstance(got, PairProblem) and layout is not Layout.auto:
                seen = got.meta.provenance.steps[-1].removeprefix("format:pair:")
                if seen != layout.value:
                    got = PairProblem(
                        "pair:unknown_layout", f"read as {seen}, expected --layout {layout.value}"
                    )
            if isinstance(got, PairProblem):
                quarantined.append(got.quarantined(item))
            else:
                pairs.append(got)
    inputs = [{"path": f, "sha256": shas[f], "items": read[f]} for f in files]
    manifest = write_pair_set(pairs, out, cfg, quarantine=quarantined, inputs=inputs, overwrite=overwrite)
    console.print(
        f"read {sum(read.values())} item(s) from {len(files)} file(s): {len(pairs)} pair(s), "
        f"{len(quarantined)} quarantined"
        + (f" → {escape(str(out / 'quarantine.jsonl'))}" if quarantined else "")
    )
    if not print_pair_set(manifest, out):
        raise typer.Exit(EXIT_GATES_FAILED)


def resolve_checkpoint(path: str) -> str:
    """A run directory → its latest checkpoint; a checkpoint directory as it is."""
    p = Path(path)
    if not (p / "model.safetensors").is_file() and (p / "checkpoints").is_dir():
        from moeforge.train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(p)
        if latest is not None:
            return str(latest)
    return path


@app.command("generate")
def generate(
    config_path: Path = typer.Argument(
        ..., metavar="CONFIG", help="Generate config YAML (kind, dataset, checkpoint, samples …)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Pair set directory; samples of an unfinished run are kept in OUT.partial."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config value: key.path=value (repeatable)."
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Discard the samples in OUT.partial and start over."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    unsafe: bool = typer.Option(
        False,
        "--confirm-run-unsafe-code",
        help="Let HumanEval pairs run model-written code (a subprocess sandbox with a timeout and no network; "
        "see configs/eval/sandbox.py).",
    ),
) -> None:
    """Generate preference pairs by sampling a checkpoint, and write them as a pair set.

    kind verifiable: K replies per GSM8K or HumanEval prompt, judged by the eval suite's checkers; a correct
    reply is chosen over an incorrect one (the dataset's answer when none is correct). kind reference: the
    dataset's answer over a reply a named rule judges worse. kind identity: the expected identity answer over
    a reply that fails the identity check, on identity and adversarial prompts. Every side records how it was
    made. The run is deterministic for a seed and resumable: rerun the same command after an interruption.

    Exit codes: 0 all gates pass; 1 a gate failed; 2 a usage or input error.
    """
    from moeforge.data.pairgen import generate_pairs, load_generate_config
    from moeforge.serve.chat_sampler import EngineSampler

    cfg = load_generate_config(config_path, overrides)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    if checkpoint != cfg.checkpoint:
        console.print(f"checkpoint: {escape(checkpoint)} (the latest of {escape(cfg.checkpoint)})")
        cfg = cfg.model_copy(update={"checkpoint": checkpoint})
    sampler = EngineSampler(cfg.checkpoint, max_batch=cfg.batch_size, device=cfg.device)
    started = time.perf_counter()
    with Bars(Console(stderr=True), transient=True) as bars:

        def progress(done: int, total: int) -> None:
            speed = rate(sampler.tokens / sampler.seconds, "tok") if sampler.seconds else ""
            bars.update("pairs", f"sample {cfg.kind}", done, total, _rate=speed)

        result = generate_pairs(
            cfg,
            out,
            sampler,
            restart=restart,
            overwrite=overwrite,
            allow_code_execution=unsafe,
            progress=progress,
        )
    wall = time.perf_counter() - started
    speed = f", {rate(sampler.tokens / sampler.seconds, 'tok')}" if sampler.seconds else ""
    console.print(
        f"{result.prompts} prompt(s) × {cfg.samples}: {result.samples} replies, {result.passed} passed the check"
        f", {result.empty} empty; {sampler.tokens} tokens generated in {clock(sampler.seconds)}{speed}; "
        f"wall {clock(wall)} (chunks {result.chunks}, resumed {result.chunks_resumed})"
    )
    console.print("prompts: " + ", ".join(f"{k} {v}" for k, v in result.outcomes.items()))
    console.print(
        "pairs made (chosen/rejected): "
        + (", ".join(f"{k} {v}" for k, v in result.pairs_made.items()) or "none")
    )
    if not print_pair_set(result.manifest, out):
        raise typer.Exit(EXIT_GATES_FAILED)
