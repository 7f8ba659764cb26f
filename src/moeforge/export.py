"""`moeforge export hf|hub`: a trainer checkpoint → a Hugging Face model directory, and its upload.

The directory holds everything ``transformers`` needs offline — ``config.json``, the weights
(``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` above
``max_shard_bytes``, 5 GB by default), ``tokenizer.json`` + ``tokenizer_config.json`` with the ChatML
chat template, ``generation_config.json`` (stop on ``<|im_end|>`` and ``<|endoftext|>``) — and a model
card ``README.md``: architecture, total and active parameters, the training data (the token manifest's
fingerprint and the pipeline manifest's sha256), training and evaluation figures from the run's
``summary.json``, intended use and limitations. The layout (Mixtral, Qwen2-MoE or Llama) and what it
cannot represent are decided by :mod:`moeforge.model.hf`, which refuses rather than export something
that computes differently (e.g. ghost experts caught half-awake).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from moeforge.io import atomic_directory, atomic_write_bytes, atomic_write_text, save_safetensors
from moeforge.model.hf import hf_layout, to_hf_state_dict
from moeforge.model.sizing import count_params

__all__ = [
    "ExportError",
    "HubUpload",
    "HubVerificationError",
    "export_checkpoint",
    "file_digests",
    "save_sharded",
    "upload_to_hub",
]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5_000_000_000


class ExportError(ValueError):
    """The export or upload cannot be done as asked; the message says why and what to do."""


class HubVerificationError(ExportError):
    """The upload went through but the Hub's listing does not match the local files."""


def save_sharded(
    state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write ``state`` as one ``model.safetensors`` or, when larger than ``max_shard_bytes``, as numbered
    shards (filled in key order) plus ``model.safetensors.index.json``. Returns the file names."""
    meta = {"format": "pt", "producer": "moeforge"}
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_safetensors(state, out / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    shards: list[list[str]] = [[]]
    filled = 0
    for k in sorted(state):
        if shards[-1] and filled + sizes[k] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += sizes[k]
    n = len(shards)
    weight_map: dict[str, str] = {}
    names = []
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_safetensors({k: state[k] for k in keys}, out / name, metadata=meta)
        weight_map.update(dict.fromkeys(keys, name))
        names.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def export_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Export the checkpoint at ``path`` (a checkpoint or run directory) into ``out``; atomic."""
    from moeforge.model.hf import ExportError as LayoutError
    from moeforge.pretrained import find_checkpoint_tokenizer
    from moeforge.serve.engine import Engine, EngineError
    from moeforge.train.checkpoint import latest_checkpoint

    p = Path(path).resolve()
    ckpt = p if (p / "model.safetensors").is_file() else (latest_checkpoint(p) if p.is_dir() else None)
    if ckpt is None:
        raise ExportError(f"{path}: no checkpoint here (a run directory or checkpoints/step-… directory)")
    try:
        engine = Engine.from_checkpoint(ckpt)
    except EngineError as exc:
        raise ExportError(str(exc)) from exc
    model = engine.model.eval()
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    tok_dir = find_checkpoint_tokenizer(ckpt, state)
    if tok_dir is None or not (Path(tok_dir) / "tokenizer_config.json").is_file():
        raise ExportError(
            f"{ckpt}: no tokenizer (tokenizer.json + tokenizer_config.json) in the run; an export without "
            "one is not usable — train from `moeforge data tokenize` output, which carries its tokenizer"
        )
    try:
        chosen = layout or hf_layout(model.cfg)
        weights, hf_cfg = to_hf_state_dict(model, chosen)
    except LayoutError as exc:
        raise ExportError(str(exc)) from exc
    tok = engine.tokenizer
    eos = [i for i in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")) if i is not None]
    pad = tok.token_to_id("<|pad|>")
    hf_cfg.update({"eos_token_id": eos[-1] if eos else None, "pad_token_id": pad, "bos_token_id": None})
    gen = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None, "do_sample": False}
    run = _run_dir(ckpt)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        files = save_sharded(weights, tmp, max_shard_bytes)
        # every file through atomic_write_*: fsynced, and each write a fault point (tests/faults)
        atomic_write_text(tmp / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            atomic_write_bytes(tmp / name, (Path(tok_dir) / name).read_bytes())
        atomic_write_text(tmp / "README.md", model_card(model.cfg, chosen, state, run))
    log.info("exported %s as %s (%s) → %s", ckpt, chosen, ", ".join(files), out)
    return Path(out)


def model_card(cfg: Any, layout: str, state: dict[str, Any], run: Path) -> str:
    """The README.md of an export: what the model is, what it was trained on, how it scores, its limits."""
    p = count_params(cfg)
    summary = _read_json(run / "summary.json") or {}
    train_cfg = state.get("config") or {}
    tokens_dir = Path((_read_json(run / "config.json") or {}).get("tokens", ""))
    tokens = _read_json(tokens_dir / "manifest.json") if tokens_dir.name else None
    moe = cfg.moe
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [moeforge, mixture-of-experts]" if moe else "tags: [moeforge]",
        "---",
        "",
        f"# {train_cfg.get('name') or cfg.name}",
        "",
        f"A {'Mixture-of-Experts' if moe else 'dense'} decoder-only language model trained with "
        "moeforge and exported in the "
        f"`{layout}` layout (`transformers.AutoModelForCausalLM` loads it).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {p.total:,} total, {p.active:,} active per token |",
        f"| layers × width | {cfg.n_layers} × {cfg.d_model} ({cfg.n_heads} heads, {cfg.kv_heads} key/value heads) |",
        f"| vocabulary / context | {cfg.vocab_size:,} / {cfg.max_seq_len:,} tokens |",
    ]
    if moe:
        lines.append(
            f"| experts | {moe.num_experts} routed, top-{moe.top_k}, expert hidden {moe.expert_hidden}"
            + (f", {moe.num_shared_experts} shared" if moe.num_shared_experts else "")
            + f", in layers {cfg.moe_layer_indices} |"
        )
    lines += ["", "## Training data", ""]
    if tokens:
        src = tokens.get("source") or {}
        lines.append(
            f"Dataset `{src.get('name')}` (pipeline manifest sha256 `{src.get('manifest_sha256')}`), "
            f"tokenized as `{tokens.get('mode')}` blocks of {tokens.get('seq_len')} tokens (token manifest "
            f"fingerprint `{tokens.get('fingerprint')}`, tokenizer sha256 `{(tokens.get('tokenizer') or {}).get('sha256')}`)."
        )
        lines += ["", "| split | samples | tokens |", "|---|---|---|"]
        for split, s in (tokens.get("splits") or {}).items():
            lines.append(f"| {split} | {s.get('samples', 0):,} | {s.get('tokens', 0):,} |")
        lines.append(f"\nDomains: {', '.join(tokens.get('domains') or [])}.")
    else:
        lines.append("The token manifest of the training run was not found; the data is undocumented here.")
    lines += ["", "## Training", ""]
    if summary:
        lines.append(
            f"{summary.get('steps')} optimizer steps, {summary.get('tokens_seen', 0):,} tokens, status "
            f"`{summary.get('status')}`; collapse events: {len(summary.get('collapse_events') or [])}."
        )
    lines += ["", "## Evaluation", ""]
    for split in ("final_valid", "test"):
        res = summary.get(split) or {}
        if res.get("loss") is not None:
            per = ", ".join(
                f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(res.items()) if k.startswith("loss/")
            )
            lines.append(
                f"- {split.replace('final_', '')}: loss {res['loss']:.4f} (perplexity {res['ppl']:.2f})"
                + (f"; per domain: {per}" if per else "")
            )
    harness = ((_read_json(run / "eval" / "results.json") or {}).get("tasks")) or {}
    if harness:
        lines += [
            "",
            "lm-evaluation-harness (`moeforge eval`, the `moeforge` lm-eval model):",
            "",
            "| task | metric | value | ± stderr | samples | few-shot |",
            "|---|---|---|---|---|---|",
        ]
        for task, entry in sorted(harness.items()):
            metrics = entry.get("metrics") or {}
            for key, value in sorted(metrics.items()):
                name, _, filt = key.partition(",")
                if "_stderr" in name or name == "sample_len" or not isinstance(value, (int, float)):
                    continue
                err = metrics.get(f"{name}_stderr,{filt}")
                shots = entry.get("num_fewshot")
                lines.append(
                    f"| {task} | {name if filt in ('', 'none') else f'{name} ({filt})'} | {value:.4f} | "
                    f"{'' if not isinstance(err, (int, float)) else f'{err:.4f}'} | {entry.get('n_samples', '')} | "
                    f"{'task default' if shots is None else shots} |"
                )
    elif not any((summary.get(s) or {}).get("loss") is not None for s in ("final_valid", "test")):
        lines.append("No evaluation results were recorded for this run.")
    lines += [
        "",
        "## Intended use",
        "",
        "Research and education: studying routing, expert specialization and training dynamics of small "
        "MoE models, and testing serving stacks. Chats use ChatML (`<|im_start|>role\\n…<|im_end|>`); the "
        "tokenizer's `chat_template` renders it.",
        "",
        "## Limitations",
        "",
        "- A small model trained on a small corpus: it produces fluent-looking but unreliable text and must "
        "not be used for decisions, facts or advice.",
        "- It inherits the biases and gaps of its training data (see the manifest above).",
        "- Capacity-factor token dropping and aux-free routing biases have no representation in the "
        "exported format; the export is dropless.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


class HubUpload(list[tuple[str, int]]):
    """The files of an upload as ``(path, bytes)`` pairs — a plain list to callers that want only that —
    plus where they went: ``url`` (the repository's page), ``commit`` (the commit the upload created;
    ``None`` for a dry run) and ``verified`` (path → ``"sha256 <hex>"`` for LFS files or ``"blob <sha1>"``
    for regular ones, as the Hub listed them at ``commit``; empty for a dry run)."""

    def __init__(
        self,
        files: list[tuple[str, int]],
        *,
        url: str,
        commit: str | None = None,
        verified: dict[str, str] | None = None,
    ) -> None:
        super().__init__(files)
        self.url = url
        self.commit = commit
        self.verified: dict[str, str] = dict(verified or {})


_HASH_CHUNK = 1 << 20


def file_digests(path: Path) -> tuple[str, str]:
    """``(sha256, git blob id)`` of the file at ``path`` in one streaming pass: the sha256 is what the Hub
    lists for an LFS file (``lfs.sha256``), the blob id — sha1 of ``b"blob <size>\\0" + content`` — what it
    lists as ``oid`` for a file stored in git."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _upload_files(d: Path) -> list[tuple[str, int]]:
    """The files ``HfApi.upload_folder`` sends from ``d``: every file below it (POSIX paths relative to
    ``d``), less ``.git`` and ``.cache/huggingface`` (huggingface_hub's ``DEFAULT_IGNORE_PATTERNS``)."""
    out = []
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if not f.is_file() or "/.git/" in f"/{rel}/" or "/.cache/huggingface/" in f"/{rel}/":
            continue
        out.append((rel, f.stat().st_size))
    return out


def _compare(
    files: list[tuple[str, int]], local: dict[str, tuple[str, str]], remote: dict[str, Any]
) -> tuple[dict[str, str], list[str]]:
    """Each local file against its ``RepoFile`` in the Hub's listing: ``(verified, problems)``."""
    verified: dict[str, str] = {}
    problems: list[str] = []
    for name, size in files:
        sha256, blob = local[name]
        entry = remote.get(name)
        if entry is None:
            problems.append(f"{name}: missing from the commit (expected sha256 {sha256}, {size} bytes)")
        elif entry.lfs is not None:  # LFS or Xet storage: the Hub lists the content's sha256 and size
            got_sha, got_size = str(entry.lfs.sha256).lower(), int(entry.lfs.size)
            if got_sha != sha256 or got_size != size:
                problems.append(
                    f"{name}: sha256 expected {sha256} ({size} bytes), got {got_sha} ({got_size} bytes)"
                )
            else:
                verified[name] = f"sha256 {sha256}"
        else:  # a regular git file: the Hub lists its git blob id
            got_blob, got_size = str(entry.blob_id).lower(), int(entry.size)
            if got_blob != blob or got_size != size:
                problems.append(
                    f"{name}: git blob id expected {blob} ({size} bytes), got {got_blob} ({got_size} bytes)"
                )
            else:
                verified[name] = f"blob {blob}"
    return verified, problems


def upload_to_hub(
    directory: str | os.PathLike[str],
    repo: str,
    *,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> HubUpload:
    """Upload an export directory to the Hugging Face Hub as model repo ``repo``, then verify it: the Hub's
    listing at the commit the upload created must hold every local file with the same sha256 (LFS files)
    or git blob id (regular files) and size. Returns the files (path, bytes) uploaded and verified — or,
    with ``dry_run``, that would be uploaded. ``endpoint`` is a Hub mirror or a private Hub (default:
    ``$HF_ENDPOINT``, else https://huggingface.co). Fails clearly without a token or network, and with
    :class:`HubVerificationError` naming each file the Hub does not hold as it is here."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not any(d.glob("model*.safetensors")):
        raise ExportError(
            f"{d}: not an export (needs config.json and model*.safetensors); run `moeforge export hf`"
        )
    files = _upload_files(d)
    if "/" not in repo or repo.count("/") != 1:
        raise ExportError(f"--repo must be OWNER/NAME, got {repo!r}")
    if dry_run:
        base = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return HubUpload(files, url=f"{base.rstrip('/')}/{repo}")
    try:
        from huggingface_hub import HfApi, RepoFile, get_token
    except ImportError as exc:
        raise ExportError("uploading needs huggingface_hub: pip install 'moeforge[hf]'") from exc
    tok = token or os.environ.get("HF_TOKEN") or get_token()
    if not tok:
        raise ExportError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=tok)
    local = {name: file_digests(d / name) for name, _ in files}
    # Transfer protocol: with hf_xet installed, huggingface_hub (2.4.0) sends every non-regular file through
    # Xet without asking the server — `upload_folder` takes its Xet pipeline whenever `is_xet_available()`,
    # whatever upload mode the Hub's preupload answer names — and has no LFS fallback. The only switch is
    # HF_HUB_DISABLE_XET, read once when huggingface_hub is imported. huggingface.co speaks Xet; a mirror
    # or private Hub that does not needs HF_HUB_DISABLE_XET=1 in the environment (the tests' stand-in Hub
    # on 127.0.0.1 sets it and is uploaded to over the LFS basic transfer). The check below holds for both:
    # the Hub lists an LFS or Xet file with its content's sha256 (`lfs.sha256`), a git file by blob id.
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(d), repo_id=repo, repo_type="model")
        if isinstance(info, Future):  # only with run_as_future=True; kept for the type checker
            info = info.result()
        commit = info.oid
        remote = {
            e.path: e
            for e in api.list_repo_tree(repo, recursive=True, revision=commit, repo_type="model")
            if isinstance(e, RepoFile)
        }
    except Exception as exc:  # huggingface_hub raises HTTP and connection errors of many types
        hint = ""
        if "xet" in str(exc).lower():
            hint = (
                f"; {api.endpoint} may not support the Xet protocol: set HF_HUB_DISABLE_XET=1 to upload "
                "over LFS instead"
            )
        raise ExportError(f"upload to {repo} failed: {exc.__class__.__name__}: {exc}{hint}") from exc
    verified, problems = _compare(files, local, remote)
    if problems:
        raise HubVerificationError(
            f"upload to {repo} at {api.endpoint} did not verify: {len(problems)} of {len(files)} files differ "
            f"from the Hub's listing at commit {commit}:\n  "
            + "\n  ".join(problems)
            + f"\nThe local files in {d} are untouched; rerun `moeforge export hub {d} --repo {repo}` to "
            "upload them again (files the Hub already holds intact are skipped)."
        )
    log.info("uploaded %d files to %s/%s at commit %s, each verified", len(files), api.endpoint, repo, commit)
    return HubUpload(files, url=f"{api.endpoint.rstrip('/')}/{repo}", commit=commit, verified=verified)
