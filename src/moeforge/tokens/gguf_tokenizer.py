"""A GGUF file's tokenizer as a Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

GGUF stores the vocabulary, the BPE merges, each token's type and the special-token ids as metadata
(``tokenizer.ggml.*``), and names the pre-tokenizer — the regex that splits text before BPE — only by a
key, ``tokenizer.ggml.pre``. The pre-tokenizer matters: SmolLM's (``smollm``) splits every digit on its
own, so ``2024`` is four tokens; the plain GPT-2 split would make it one or two and change the model's
input. llama.cpp defines each key as a list of regexes; :data:`PRE_TOKENIZERS` writes the ones moeforge
knows as ``tokenizers`` pre-tokenizers, and any other key is refused by name rather than guessed.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM, Qwen2, Llama 3) is built here with the
``tokenizers`` library. Tokens of type CONTROL become special tokens (one id, never split, skipped when
decoding); USER_DEFINED ones become added tokens. SentencePiece files (``llama``) are refused: moeforge
trains and serves byte-level BPE only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from moeforge.io import atomic_write_text

__all__ = ["PRE_TOKENIZERS", "GGUFTokenizerError", "tokenizer_from_gguf", "write_gguf_tokenizer"]

log = logging.getLogger(__name__)

CONTROL, USER_DEFINED = 3, 4

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre → (split regexes applied in order, then byte-level mapping); None = GPT-2's own split
PRE_TOKENIZERS: dict[str, tuple[str, ...] | None] = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    "smollm": (r"\p{N}",),  # llama.cpp: "\p{N}" then GPT-2's split; HF's SmolLM2: Digits(individual)
    "starcoder": (r"\p{N}",),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer cannot be rebuilt faithfully; the message names the metadata field."""


def _pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer moeforge knows "
            f"({', '.join(sorted(PRE_TOKENIZERS))}); importing it would split text differently from the model"
        )
    splits = PRE_TOKENIZERS[pre]
    if splits is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps: list[Any] = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    # a split of single digits first, then GPT-2's own regex inside ByteLevel (SmolLM, StarCoder)
    gpt2_after = splits == (r"\p{N}",)
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_after))
    return pre_tokenizers.Sequence(steps)


def tokenizer_from_gguf(meta: dict[str, Any], path: str | os.PathLike[str] = "<gguf>") -> tuple[Any, dict]:
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` from a GGUF's metadata (the ``tokenizer.ggml.*``
    arrays read whole). Raises :class:`GGUFTokenizerError` naming the field it cannot honour."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    p = Path(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(
            f"{p}: tokenizer.ggml.model={kind!r}; moeforge imports byte-level BPE tokenizers ('gpt2') only"
        )
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens or not merges:
        raise GGUFTokenizerError(f"{p}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing or empty")
    if len(types) != len(tokens):
        raise GGUFTokenizerError(
            f"{p}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for n, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFTokenizerError(f"{p}: tokenizer.ggml.merges[{n}]={m!r} is not two tokens")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), p)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == CONTROL
    ]
    added = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == USER_DEFINED
    ]
    tok.add_special_tokens(specials)
    if added:
        tok.add_tokens(added)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFTokenizerError(f"{p}: rebuilding the vocabulary changed its size; the file is inconsistent")

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": [a.content for a in specials],
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 1_000_000)),
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return tok, config


def write_gguf_tokenizer(meta: dict[str, Any], out_dir: str | os.PathLike[str], path: str = "<gguf>") -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for a GGUF's tokenizer into ``out_dir``."""
    tok, config = tokenizer_from_gguf(meta, path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = json.loads(tok.to_str())
    atomic_write_text(
        out / "tokenizer.json", json.dumps(blob, ensure_ascii=False, sort_keys=True, indent=1) + "\n"
    )
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("tokenizer from %s: %d tokens → %s", path, tok.get_vocab_size(with_added_tokens=True), out)
    return out
