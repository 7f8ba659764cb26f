"""Hugging Face datasets as sources: a directory written by ``save_to_disk``, or a hub name.

Needs the ``[hf]`` extra (``datasets``). A hub name (``openai/gsm8k`` with ``config`` and ``split``) is
loaded through the ``datasets`` cache. Offline — ``HF_HUB_OFFLINE=1`` or the hub unreachable — only a
copy already in the local cache can be used, and anything else fails at planning time with a message
that says how to point the recipe at local files instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from moeforge.data.sources import RawItem, SourceError
from moeforge.io import sha256_file

if TYPE_CHECKING:
    from moeforge.data.recipe import HfSource

__all__ = ["check_hf_source", "hf_sha256", "hf_uri", "iter_hf_items"]

_HUB = ("huggingface.co", 443)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError(
            "hf sources need the `datasets` package: pip install 'moeforge[hf]' (or use path: with local files)"
        ) from exc
    datasets.disable_progress_bars()
    return datasets


def _offline() -> bool:
    if (
        os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
        or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    ):
        return True
    try:
        with socket.create_connection(_HUB, timeout=3):
            return False
    except OSError:
        return True


def hf_uri(src: HfSource) -> str:
    if src.path is not None:
        return f"hf-disk://{src.path}" + (f"#{src.split}" if src.split else "")
    return (
        f"hf://{src.name}" + (f"/{src.config}" if src.config else "") + (f"/{src.split}" if src.split else "")
    )


def _advice(src: HfSource) -> str:
    return (
        f"hf source {src.name!r}: the Hugging Face hub is not reachable (offline) and the dataset is not in "
        "the local cache. Point the source at local files instead — `path: data/train.jsonl` (JSONL, CSV, "
        "Parquet …) or `hf: {path: DIR}` for a dataset written with save_to_disk — or download it on a "
        "machine with network access and copy the HF cache (~/.cache/huggingface) here"
    )


def _load(src: HfSource) -> Any:
    ds = _datasets()
    if src.path is not None:
        if not os.path.isdir(src.path):
            raise SourceError(
                f"hf source path {src.path}: no such directory (expected a save_to_disk folder)"
            )
        try:
            data = ds.load_from_disk(src.path)
        except (FileNotFoundError, ValueError) as exc:
            raise SourceError(f"hf source path {src.path}: not a saved dataset ({exc})") from exc
    else:
        if src.split is None:
            raise SourceError(f"hf source {src.name!r}: set split (e.g. split: train) for a hub dataset")
        offline = _offline()
        saved = ds.config.HF_HUB_OFFLINE
        ds.config.HF_HUB_OFFLINE = saved or offline
        try:
            data = ds.load_dataset(src.name, src.config, split=src.split)
        except Exception as exc:  # datasets raises many types for "not available offline"
            if offline:
                raise SourceError(_advice(src)) from exc
            raise SourceError(f"hf source {src.name!r}: cannot load ({exc})") from exc
        finally:
            ds.config.HF_HUB_OFFLINE = saved
    if isinstance(data, ds.DatasetDict):
        if src.split is None:
            if len(data) != 1:
                raise SourceError(
                    f"hf source {src.path}: holds splits {sorted(data)}; set split: to one of them"
                )
            return next(iter(data.values()))
        if src.split not in data:
            raise SourceError(f"hf source {src.path}: no split {src.split!r} (has {sorted(data)})")
        return data[src.split]
    if src.split is not None and src.path is not None:
        raise SourceError(
            f"hf source {src.path}: holds a single dataset with no splits; remove `split: {src.split}` "
            "(the split of our records is decided by the recipe's split section)"
        )
    return data


def check_hf_source(src: HfSource) -> None:
    """Fail now (at planning) when the dataset cannot be loaded."""
    _load(src)


def hf_sha256(src: HfSource) -> str:
    """sha256 over the dataset's Arrow files (name and content hash of each, in order)."""
    data = _load(src)
    h = hashlib.sha256()
    for f in sorted({c["filename"] for c in data.cache_files}):
        h.update(f"{os.path.basename(f)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def iter_hf_items(src: HfSource) -> Iterator[RawItem]:
    """Every row as a raw item, with its row index as the offset."""
    uri = hf_uri(src)
    for i, row in enumerate(_load(src)):
        yield RawItem(data=dict(row), uri=uri, offset=i)
