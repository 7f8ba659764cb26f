"""The on-disk format of token shards: Megatron's ``MMIDIDX`` header and dtype codes, file names, errors.

Shared by the writer (:mod:`.writer`) and the reader (:mod:`.reader`); the layout itself is described in
:mod:`moeforge.tokens.shards`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
SIDECARS = (".mask", ".dom")


class ShardError(ValueError):
    """A shard file is missing, corrupt, truncated or inconsistent with its index."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest on-disk dtype for ``vocab_size`` ids: uint16 below 65,500 (room to grow), else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65_500 else np.dtype(np.int32)


def shard_paths(prefix: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of the shard at ``prefix`` by extension: ``.bin``, ``.idx`` and the sidecars ``.mask``, ``.dom``."""
    p = Path(prefix)
    return {ext: p.with_name(p.name + ext) for ext in (".bin", ".idx", *SIDECARS)}
