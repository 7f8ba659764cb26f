"""`moeforge data tokenize`: a pipeline run → packed, indexed token shards per split, with a manifest.

The output directory holds ``{split}.bin`` / ``.idx`` (Megatron indexed dataset), ``{split}.mask`` (SFT
loss mask) and ``{split}.dom`` (domain id per sample) for each split, a copy of the tokenizer's files in
``tokenizer/`` (so whatever trains on the tokens can decode them), and ``manifest.json``:

```
{"format": "moeforge.tokens/1", "fingerprint": …, "name": …, "seq_len": …, "mode": "pretrain"|"sft",
 "source": {"name": …, "manifest_sha256": …}, "tokenizer": {"sha256", "vocab_size", "eos_id", "pad_id",
 "dtype"}, "domains": [...], "splits": {"train": {"prefix", "samples", "tokens", "packing_efficiency",
 …, "files": {"train.bin": {"bytes", "sha256"}, …}}, …}}
```

No clock, host or absolute path goes into the manifest: the same inputs give the same bytes. With no
``out`` the result lives in the pretokenized cache (:mod:`moeforge.tokens.cache`) and a second call with
the same inputs is a hit that does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from moeforge import __version__
from moeforge.data.manifest import load_manifest
from moeforge.data.store import iter_line_bytes
from moeforge.io import (
    DirectoryLock,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
)
from moeforge.tokens import cache as token_cache
from moeforge.tokens.chat_spec import load_chat_spec
from moeforge.tokens.pack import PackMode, PackStats, pack_records, parse_record
from moeforge.tokens.shards import IndexedShardWriter, token_dtype
from moeforge.tokens.tokenizer import load_tokenizer, token_ids, tokenizer_files, tokenizer_sha256

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "RunFileChangedError",
    "TokenizeResult",
    "dataset_label",
    "tokenize_run",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = "moeforge.tokens/1"
SPLITS = ("train", "valid", "test")


@dataclass
class TokenizeResult:
    path: Path
    built: bool  # False: served from the cache without work
    manifest: dict[str, Any]


def dataset_label(manifest: dict[str, Any]) -> str:
    """A readable dataset name: the hub name (+ config) of a run made from one Hugging Face source,
    else the recipe's name."""
    sources = (manifest.get("recipe") or {}).get("sources") or []
    hf = [s["hf"] for s in sources if isinstance(s, dict) and s.get("hf")]
    if len(sources) == 1 and len(hf) == 1 and hf[0].get("name"):
        return "_".join(x for x in (hf[0]["name"], hf[0].get("config")) if x)
    return str(manifest.get("name") or "dataset")


class RunFileChangedError(ValueError):
    """A record shard of the data run is not the file its manifest lists (size or sha256)."""


def _check_run_file(run_dir: Path, f: dict[str, Any]) -> Path:
    """``run_dir / f["path"]`` once its size and sha256 match the run's manifest entry ``f``: a flipped byte
    in a compressed shard can decode to other text without any error, and must never reach the tokens."""
    path = run_dir / str(f["path"])
    size = path.stat().st_size  # a missing file: FileNotFoundError, naming it
    want = f.get("sha256")
    if ("bytes" in f and size != int(f["bytes"])) or (want and sha256_file(path) != want):
        raise RunFileChangedError(
            f"{path}: differs from the data run's manifest ({run_dir / 'manifest.json'} lists "
            f"{f.get('bytes', '?')} bytes, sha256 {str(want)[:12]}…): the file changed after the run. "
            f"`moeforge data verify {run_dir}` lists every such file; restore it or run the recipe again"
        )
    return path


def _records(run_dir: Path, files: list[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    def all_records() -> Iterator[dict[str, Any]]:
        for f in files:  # each file is checked against the manifest just before it is read
            path = _check_run_file(run_dir, f)
            for n, line in enumerate(iter_line_bytes(path), 1):
                try:
                    yield parse_record(line)
                except ValueError as exc:
                    raise ValueError(
                        f"{path}:{n}: not a record of the dataset contract ({exc}); "
                        f"`moeforge data verify {run_dir}` checks every record"
                    ) from None

    return islice(all_records(), limit) if limit is not None else all_records()


def tokenize_run(
    run_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    *,
    seq_len: int,
    mode: PackMode = "pretrain",
    out: str | os.PathLike[str] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    max_records: int | None = None,
    splits: tuple[str, ...] = SPLITS,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> TokenizeResult:
    """Tokenize and pack every split of ``run_dir`` with the tokenizer at ``tokenizer``.

    ``out`` writes to that directory (atomically; refused when it exists unless ``overwrite``); without
    it the result goes to the cache. A second call with the same ``out`` while this one runs fails at
    once (:class:`~moeforge.io.DirectoryLockedError`; the lock file is ``.OUT.lock`` beside it).
    ``max_records`` caps the records read per split (part of the fingerprint). ``progress(split, done,
    total)`` reports records finished.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1 (got {seq_len})")
    if mode not in ("pretrain", "sft"):
        raise ValueError(f"mode must be pretrain or sft (got {mode!r})")
    run = Path(run_dir)
    manifest = load_manifest(run)
    tok_sha = tokenizer_sha256(tokenizer)
    tok = load_tokenizer(tokenizer)
    chat_spec = load_chat_spec(
        tokenizer
    )  # an imported model's default system turn, rendered as its template does
    eos_id, pad_id = token_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    outputs = manifest.get("outputs") or {}
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    domains = sorted({c["domain"] for c in manifest.get("counts", []) if c.get("split") in splits})
    fp = token_cache.fingerprint(
        {
            "format": FORMAT_VERSION,
            "run_manifest_sha256": sha256_file(run / "manifest.json"),
            "tokenizer_sha256": tok_sha,
            "seq_len": seq_len,
            "mode": mode,
            "max_records": max_records,
            "splits": list(splits),
        }
    )
    label = dataset_label(manifest)
    tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    tok_label = f"{tok_dir.resolve().name or 'tok'}-{tok_sha[:8]}"

    def build(target: Path) -> None:
        split_info: dict[str, Any] = {}
        for split in splits:
            files = outputs.get(split) or []
            total = sum(int(f.get("records", 0)) for f in files)
            if max_records is not None:
                total = min(total, max_records)
            done = 0

            def step(n: int, split: str = split, total: int = total) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(split, done, total)

            writer = IndexedShardWriter(target / split, dtype, loss_mask=mode == "sft", domains=True)
            try:
                stats: PackStats = pack_records(
                    _records(run, files, max_records),
                    tok,
                    writer,
                    seq_len=seq_len,
                    mode=mode,
                    domains=domains,
                    eos_id=eos_id,
                    progress=step,
                    default_system=chat_spec.default_system_prompt,
                )
                info = writer.close()
            except BaseException:
                writer.abort()
                raise
            split_info[split] = {"prefix": split, **stats.to_dict(), "files": info["files"]}
            log.info(
                "%s: %d records → %d samples, %d tokens, packing efficiency %.1f%%",
                split,
                stats.records,
                stats.samples,
                stats.tokens,
                100 * stats.efficiency,
            )
        # the tokenizer travels with its tokens, so a run, checkpoint or export can always find it
        tok_files: dict[str, Any] = {}
        (target / "tokenizer").mkdir(exist_ok=True)
        sources = tokenizer_files(tokenizer)
        for extra in ("tokenizer_config.json", "chat.json"):  # the chat template and its spec
            if (sources[0].parent / extra).is_file():
                sources.append(sources[0].parent / extra)
        for f in sources:
            data = f.read_bytes()
            atomic_write_bytes(target / "tokenizer" / f.name, data)
            tok_files[f.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        out_manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": fp,
            "name": entry,
            "moeforge_version": __version__,
            "seq_len": seq_len,
            "mode": mode,
            "max_records": max_records,
            "source": {"name": manifest.get("name"), "manifest_sha256": sha256_file(run / "manifest.json")},
            "tokenizer": {
                "name": tok_label,
                "sha256": tok_sha,
                "vocab_size": vocab_size,
                "eos_id": eos_id,
                "pad_id": pad_id,
                "dtype": str(dtype),
                "files": tok_files,
            },
            "domains": domains,
            "splits": split_info,
        }
        atomic_write_text(target / "manifest.json", json.dumps(out_manifest, indent=2, sort_keys=True) + "\n")

    entry = token_cache.entry_name(label, tok_label, seq_len, fp)
    if out is None:
        path, built = token_cache.build_entry(token_cache.cache_root(cache_root), entry, fp, build)
    else:
        # PARENT/.OUT.lock: a second tokenize into the same --out fails at once instead of racing this one
        lock = DirectoryLock(out, "`moeforge data tokenize --out`", beside=True)
        try:
            with atomic_directory(out, overwrite=overwrite) as tmp:
                build(tmp)
        finally:
            lock.release()
        path, built = Path(out), True
    return TokenizeResult(path, built, json.loads((path / "manifest.json").read_text(encoding="utf-8")))
