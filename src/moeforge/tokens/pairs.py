"""Preference pairs as model inputs: each side rendered after the prompt in ChatML, its completion masked.

A pair ``(prompt, chosen, rejected)`` (ChatML turns, as ``moeforge.data.preference`` holds them) becomes
two token sequences, ``prompt + chosen`` and ``prompt + rejected``, where the prompt part is the rendered
prompt turns and the opening ``<|im_start|>assistant\\n``, and a side is its assistant turns' content and
``<|im_end|>`` — exactly the span an SFT run trains on (``tokens.pack.chat_spans``). Only the side's tokens
are scored: ``labels[t]`` is the token at ``t + 1`` inside the side, −100 elsewhere, the model's
already-shifted convention, so ``objectives.sequence_logps`` of a row is log π(side | prompt).

:func:`collate_pairs` stacks ``P`` encoded pairs as ``P`` chosen rows then ``P`` rejected rows,
right-padded (a causal model's positions never see the padding after them) — the batch layout of the
``Preference`` objective. A pair whose content holds a ChatML marker, or that does not fit ``max_len``
tokens, is refused with a reason, never silently cut.

:func:`open_pair_data` reads a pair set (:mod:`moeforge.data.pairset`, sha256-checked) and encodes its
splits for a run: refused pairs are left out and counted by reason (:class:`PairSplit`), never cut.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeforge.data.preference import PreferencePair
from moeforge.tokens.pack import IM_END, IM_START, render_chat

log = logging.getLogger(__name__)

__all__ = [
    "EncodedPair",
    "PairData",
    "PairRefused",
    "PairSplit",
    "collate_pairs",
    "encode_pair",
    "encode_split",
    "open_pair_data",
    "pad_id",
]


class PairRefused(ValueError):
    """A pair that cannot become model input; ``reason`` is a short machine-readable name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class EncodedPair:
    """``prompt`` ids (through the assistant header) and each side's ids (content + ``<|im_end|>``)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def sequence(self, side: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one side: every token but the last as input, the side's tokens as
        labels at the positions that predict them."""
        ids = self.prompt + (self.chosen if side == "chosen" else self.rejected)
        n_prompt = len(self.prompt)
        labels = [ids[t + 1] if t + 1 >= n_prompt else -100 for t in range(len(ids) - 1)]
        return ids[:-1], labels


def _turns(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role, content = str(m["role"]), str(m["content"])
        if IM_START in content or IM_END in content:
            raise PairRefused(
                "pair:marker_in_content", f"a {where} turn contains a ChatML marker ({IM_START}/{IM_END})"
            )
        out.append({"role": role, "content": content})
    return out


def encode_pair(
    tokenizer: Any,
    prompt: Sequence[Mapping[str, Any]],
    chosen: Sequence[Mapping[str, Any]],
    rejected: Sequence[Mapping[str, Any]],
    *,
    max_len: int,
) -> EncodedPair:
    """Token ids of a pair (see the module docstring); ``max_len``: the model's context, which each side's
    input (prompt + side, less its last token) must fit. Raises :class:`PairRefused`."""
    p = _turns(prompt, "prompt")
    sides = {name: _turns(turns, name) for name, turns in (("chosen", chosen), ("rejected", rejected))}
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is None or tokenizer.token_to_id(IM_START) is None:
        raise PairRefused("pair:no_chatml", "the tokenizer has no <|im_start|>/<|im_end|> tokens")
    prompt_ids = list(
        tokenizer.encode(render_chat(p) + f"{IM_START}assistant\n", add_special_tokens=False).ids
    )
    enc: dict[str, list[int]] = {}
    for name, turns in sides.items():
        if not turns or any(t["role"] != "assistant" for t in turns):
            raise PairRefused("pair:role_error", f"{name} must be assistant turns")
        ids: list[int] = []
        for i, t in enumerate(turns):  # later assistant turns (rare) open their own header
            head = "" if i == 0 else f"\n{IM_START}assistant\n"
            ids += [*tokenizer.encode(head + t["content"], add_special_tokens=False).ids, im_end]
        enc[name] = ids
        if len(prompt_ids) + len(ids) - 1 > max_len:
            raise PairRefused(
                "pair:too_long",
                f"prompt ({len(prompt_ids)} tokens) + {name} ({len(ids)}) does not fit the context of {max_len}",
            )
    return EncodedPair(prompt_ids, enc["chosen"], enc["rejected"])


def collate_pairs(
    pairs: Sequence[EncodedPair], *, pad_id: int, ref_logps: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The ``Preference`` objective's batch: ``input_ids`` and ``labels`` ``[2P, T]`` (chosen rows, then
    rejected rows, right-padded with ``pad_id`` / −100) and, when given, ``ref_logps`` ``[2P]`` — the
    reference cache's ``[P, 2]`` (chosen, rejected) laid out the same way."""
    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    rows = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "labels": labels}
    if ref_logps is not None:
        if tuple(ref_logps.shape) != (len(pairs), 2):
            raise ValueError(
                f"ref_logps must be [pairs, 2] = [{len(pairs)}, 2] (got {list(ref_logps.shape)})"
            )
        batch["ref_logps"] = torch.cat([ref_logps[:, 0], ref_logps[:, 1]])
    return batch


@dataclass
class PairSplit:
    """One split's encoded pairs, their reference log-probs ``[P, 2]`` (None without a reference) and the
    count of pairs left out, by reason."""

    name: str
    pairs: list[EncodedPair]
    ref: torch.Tensor | None = None
    refused: dict[str, int] = field(default_factory=dict)

    def batch(self, idx: Sequence[int], pad: int) -> dict[str, torch.Tensor]:
        """The objective's batch of the pairs at ``idx`` (chosen rows, then rejected rows)."""
        ref = self.ref[list(idx)] if self.ref is not None else None
        return collate_pairs([self.pairs[i] for i in idx], pad_id=pad, ref_logps=ref)


def pad_id(tokenizer: Any) -> int:
    """The id right-padding uses (never attended to by a causal model, never labelled)."""
    for name in ("<|endoftext|>", "<|im_end|>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    return 0


def encode_split(
    name: str,
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_len: int,
    default_system: str | None = None,
) -> PairSplit:
    """Encode ``pairs``; refused ones are counted by reason and left out (see the module docstring).
    ``default_system`` opens prompts that have no system turn, as the model's chat template (an imported
    model's default system turn, :mod:`moeforge.tokens.chat_spec`) and the engine that sampled them do."""
    from moeforge.tokens.chat_spec import ChatSpec, apply_default_system

    spec = ChatSpec(default_system_prompt=default_system)
    out: list[EncodedPair] = []
    refused: Counter[str] = Counter()
    for p in pairs:
        try:
            out.append(
                encode_pair(
                    tokenizer,
                    apply_default_system([m.model_dump() for m in p.prompt], spec),
                    [m.model_dump() for m in p.chosen],
                    [m.model_dump() for m in p.rejected],
                    max_len=max_len,
                )
            )
        except PairRefused as exc:
            refused[exc.reason] += 1
    if refused:
        log.warning(
            "%s pairs: %d of %d left out (%s)",
            name,
            sum(refused.values()),
            len(pairs),
            ", ".join(f"{k} {v}" for k, v in sorted(refused.items())),
        )
    return PairSplit(name, out, None, dict(sorted(refused.items())))


@dataclass
class PairData:
    """A pair set as a run uses it: the non-empty splits encoded with the run's tokenizer."""

    root: Path
    tokenizer_dir: Path
    splits: dict[str, PairSplit]
    vocab_size: int
    pad: int
    manifest_sha256: str

    def summary(self) -> dict[str, Any]:
        """For ``config.json``: where the pairs came from and how many of each split are used."""
        return {
            "path": str(self.root),
            "manifest_sha256": self.manifest_sha256,
            "tokenizer": str(self.tokenizer_dir),
            "pairs": {k: len(v.pairs) for k, v in self.splits.items()},
            "refused": {k: v.refused for k, v in self.splits.items() if v.refused},
        }


def open_pair_data(root: Path, tokenizer_dir: Path, *, max_len: int) -> PairData:
    """Read and encode every non-empty split of the pair set at ``root`` (sha256-checked), prompts without a
    system turn opened by the tokenizer's chat spec default (as SFT tokenizing and the engine do); ValueError
    (:class:`~moeforge.data.pairset.PairSetError`) names what is wrong, also a train split left empty."""
    from moeforge.data.pairset import PairSetError, load_pairset_manifest, read_pairs
    from moeforge.io import sha256_file
    from moeforge.tokens.chat_spec import load_chat_spec
    from moeforge.tokens.tokenizer import load_tokenizer

    manifest = load_pairset_manifest(root)
    tok = load_tokenizer(tokenizer_dir)
    spec = load_chat_spec(tokenizer_dir)  # an imported model's default system turn opens its prompts
    splits: dict[str, PairSplit] = {}
    for name in ("train", "valid", "test"):
        if (manifest.get("files", {}).get(f"{name}.jsonl") or {}).get("pairs"):
            split = encode_split(
                name, read_pairs(root, name), tok, max_len=max_len, default_system=spec.default_system_prompt
            )
            if split.pairs:
                splits[name] = split
            elif name == "train":
                raise PairSetError(
                    f"{root}: no train pair can be model input with data.seq_len {max_len} "
                    f"(left out: {split.refused}); raise data.seq_len or shorten the pairs"
                )
    if "train" not in splits:
        raise PairSetError(f"{root}: the train split is empty; write the pair set with a train ratio > 0")
    return PairData(
        root,
        tokenizer_dir,
        splits,
        int(tok.get_vocab_size(with_added_tokens=True)),
        pad_id(tok),
        sha256_file(root / "manifest.json"),
    )
