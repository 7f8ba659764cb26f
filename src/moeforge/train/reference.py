"""The reference model's log-probabilities of every pair, computed once and cached.

DPO and IPO compare the policy with a frozen reference. Instead of a second model in memory at every
step, :func:`reference_logps` runs the reference once over all pairs (eval mode, no gradients) and
:func:`cached_reference_logps` keeps the ``[pairs, 2]`` result (chosen, rejected) in a safetensors file
whose metadata names what it was computed from: the reference weights' sha256 and a fingerprint of the
encoded pairs. A cache that does not match both is recomputed, never reused; the file is written
atomically, so a killed run leaves the old cache or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moeforge.io import atomic_write_bytes, save_safetensors
from moeforge.tokens.pairs import EncodedPair, collate_pairs
from moeforge.train.objectives import sequence_logps

__all__ = ["cached_reference_logps", "pairs_fingerprint", "reference_logps"]

log = logging.getLogger(__name__)


def pairs_fingerprint(pairs: Sequence[EncodedPair]) -> str:
    """sha256 over the pairs' token ids, in order."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected], separators=(",", ":")).encode())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, pairs: Sequence[EncodedPair], *, pad_id: int, batch_pairs: int = 8
) -> torch.Tensor:
    """``[pairs, 2]`` float64: log π_ref(chosen | prompt) and log π_ref(rejected | prompt) per pair."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = []
        for a in range(0, len(pairs), batch_pairs):
            part = pairs[a : a + batch_pairs]
            batch = collate_pairs(part, pad_id=pad_id)
            logits = model(batch["input_ids"].to(device)).logits
            lp = sequence_logps(logits, batch["labels"].to(device)).double().cpu()
            c, r = lp.chunk(2)
            out.append(torch.stack([c, r], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)
    finally:
        model.train(was_training)


def cached_reference_logps(
    path: str | os.PathLike[str],
    pairs: Sequence[EncodedPair],
    *,
    model_sha256: str,
    compute: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The reference log-probs of ``pairs`` from the cache at ``path`` when it was computed from the same
    reference weights and the same pairs, else ``compute()``'s, written to ``path`` first."""
    target = Path(path)
    want = {
        "model_sha256": model_sha256,
        "pairs_fingerprint": pairs_fingerprint(pairs),
        "pairs": str(len(pairs)),
    }
    if target.is_file():
        try:
            with safe_open(str(target), framework="pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in want.items()):
                    return f.get_tensor("ref_logps")
            log.info("%s: computed from other weights or pairs; computing it again", target)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file: recomputed
            log.warning("%s: unreadable (%s); computing it again", target, exc)
    values = compute()
    if tuple(values.shape) != (len(pairs), 2):
        raise ValueError(f"reference log-probs must be [{len(pairs)}, 2] (got {list(values.shape)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:  # canonical bytes (save_safetensors), published with the project's atomic write
        save_safetensors({"ref_logps": values.contiguous()}, tmp, metadata=want)
        atomic_write_bytes(target, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return values
