"""The tokenizer: byte-level BPE trained on a pipeline output, with special, identity and PII tokens.

Training reads the train split of a run directory (``records/train/*.jsonl.zst``) and trains a
byte-level BPE with Hugging Face ``tokenizers`` (``[hf]`` extra). Every special token — ``<|endoftext|>``,
``<|pad|>``, the ChatML ``<|im_start|>`` / ``<|im_end|>``, the identity tokens and the data pipeline's PII
placeholders — is added as a special token, so it is one id and never split. The directory written holds
``tokenizer.json`` and ``tokenizer_config.json`` with a ChatML Jinja ``chat_template`` that
``transformers.AutoTokenizer`` loads and ``apply_chat_template`` renders.

Determinism: the same records in the same order and the same settings give the same ``tokenizer.json``
bytes (the trainer runs on the texts in record order; the JSON is written with sorted keys).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from moeforge.config import StrictModel
from moeforge.data.pii import PII_TYPES
from moeforge.data.store import iter_lines
from moeforge.io import atomic_write_text
from moeforge.tokens.pack import render_chat

__all__ = [
    "CHAT_TEMPLATE",
    "TokenizerConfig",
    "TokenizerError",
    "load_tokenizer",
    "read_tokenizer_config",
    "special_token_name",
    "special_tokens",
    "token_ids",
    "tokenizer_files",
    "tokenizer_sha256",
    "train_tokenizer",
    "verify_tokenizer",
]

log = logging.getLogger(__name__)

BASE_SPECIALS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
IDENTITY_TOKENS = ("<|oracle_sys|>", "<|oracle_intro|>", "<|author|>")
# ChatML: every turn is <|im_start|>role\ncontent<|im_end|>\n; generation starts an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """The tokenizer cannot be trained or loaded as asked; the message says why."""


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(default=32_000, ge=300, description="including the 256 byte tokens and specials")
    min_frequency: int = Field(default=2, ge=1)
    identity_tokens: list[str] = Field(default_factory=lambda: list(IDENTITY_TOKENS))
    pii_tokens: bool = Field(default=True, description="add the data pipeline's <|type|> PII placeholders")
    extra_special_tokens: list[str] = Field(default_factory=list)


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """All special tokens in id order (ids 0…n-1)."""
    pii = [f"<|{t}|>" for t in PII_TYPES] if cfg.pii_tokens else []
    out: list[str] = []
    for tok in (*BASE_SPECIALS, *cfg.identity_tokens, *pii, *cfg.extra_special_tokens):
        if tok not in out:
            out.append(tok)
    return out


def _train_texts(run_dir: Path) -> Iterator[str]:
    shards = sorted((run_dir / "records" / "train").glob("*.jsonl.zst"))
    if not shards:
        raise TokenizerError(
            f"{run_dir}: no records/train/*.jsonl.zst; point at a `moeforge data run` output"
        )
    for shard in shards:
        for _, line in iter_lines(shard):
            obj = json.loads(line)
            if obj.get("text") is not None:
                yield obj["text"]
            else:  # rendered as the model will see them, so role headers become single tokens
                yield render_chat(obj["messages"])


def _config_json(specials: list[str]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "additional_special_tokens": [t for t in specials if t not in ("<|endoftext|>", "<|pad|>")],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }


def train_tokenizer(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: TokenizerConfig
) -> Path:
    """Train on ``run_dir``'s train split and write ``out_dir/tokenizer.json`` + ``tokenizer_config.json``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise TokenizerError("tokenizer training needs the [hf] extra: pip install 'moeforge[hf]'") from exc
    specials = special_tokens(cfg)
    if cfg.vocab_size < 256 + len(specials) + 1:
        raise TokenizerError(
            f"vocab_size {cfg.vocab_size} leaves no room for merges: 256 bytes + {len(specials)} specials"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_train_texts(Path(run_dir)), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = json.loads(tok.to_str())
    atomic_write_text(
        out / "tokenizer.json", json.dumps(blob, ensure_ascii=False, sort_keys=True, indent=1) + "\n"
    )
    atomic_write_text(
        out / "tokenizer_config.json", json.dumps(_config_json(specials), indent=2, sort_keys=True) + "\n"
    )
    log.info("tokenizer: %d tokens (%d special) → %s", tok.get_vocab_size(), len(specials), out)
    return out


def tokenizer_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files that define the tokenizer in ``path``: ``tokenizer.json``, or GPT-2's ``vocab.json`` +
    ``merges.txt``."""
    p = Path(path)
    if not p.is_dir():
        if not p.exists():
            raise TokenizerError(f"{p}: no such file; train one with `moeforge tokenizer train`")
        return [p]
    if (p / "tokenizer.json").exists():
        return [p / "tokenizer.json"]
    if (p / "vocab.json").exists() and (p / "merges.txt").exists():
        return [p / "vocab.json", p / "merges.txt"]
    raise TokenizerError(
        f"{p}: holds neither tokenizer.json nor vocab.json + merges.txt; "
        "train one with `moeforge tokenizer train` or point at a GPT-2-style tokenizer directory"
    )


def read_tokenizer_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` beside a tokenizer (``path``: its directory or its ``tokenizer.json``)
    as transformers reads it — ``bos_token``, ``eos_token``, ``add_bos_token`` …; empty when there is none
    or it is not a JSON object."""
    p = Path(path)
    cfg_path = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def special_token_name(value: Any) -> str | None:
    """A special token as a tokenizer config names it: a string, or ``{"content": …}`` (older configs)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The ``tokenizers.Tokenizer`` in ``path``: a directory with ``tokenizer.json`` (or that file), or
    a GPT-2-style directory with ``vocab.json`` + ``merges.txt``.

    A GPT-2-style tokenizer is byte-level BPE; the base special tokens it lacks (``<|pad|>``, the ChatML
    markers) are appended as new ids so ChatML chats and padding work with it too.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as exc:
        raise TokenizerError("loading a tokenizer needs the [hf] extra: pip install 'moeforge[hf]'") from exc

    files = tokenizer_files(path)
    try:
        if len(files) == 1:
            return Tokenizer.from_file(str(files[0]))
        tok = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{files[0]}: not a valid {files[0].name} ({exc})") from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BASE_SPECIALS))
    return tok


def tokenizer_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over the bytes of the files that define the tokenizer (changes whenever it does), including
    an imported model's ``chat.json`` (its default system turn changes how chats are rendered)."""
    h = hashlib.sha256()
    files = tokenizer_files(path)
    chat = files[0].parent / "chat.json"
    for f in [*files, *([chat] if chat.is_file() else [])]:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def token_ids(tok: Any) -> tuple[int, int]:
    """``(eos_id, pad_id)``: ``<|endoftext|>`` and ``<|pad|>`` (EOS again when there is no pad token)."""
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        raise TokenizerError(
            "the tokenizer has no <|endoftext|> token; train one with `moeforge tokenizer train`"
        )
    pad = tok.token_to_id("<|pad|>")
    return eos, eos if pad is None else pad


def verify_tokenizer(path: str | os.PathLike[str], cfg: TokenizerConfig | None = None) -> list[str]:
    """Problems with the tokenizer in ``path`` (empty when it is sound): every special token present,
    one id, round-tripping; ordinary text round-trips; the chat template renders through transformers."""
    cfg = cfg or TokenizerConfig()
    tok = load_tokenizer(path)
    problems: list[str] = []
    vocab = tok.get_vocab()
    for s in special_tokens(cfg):
        if s not in vocab:
            problems.append(f"special token {s} is missing from the vocabulary")
            continue
        ids = tok.encode(s).ids
        if ids != [vocab[s]]:
            problems.append(
                f"special token {s} encodes to {len(ids)} ids {ids[:6]}, expected one ({vocab[s]})"
            )
        elif tok.decode(ids, skip_special_tokens=False) != s:
            problems.append(f"special token {s} does not round-trip")
    sample = "Hello, world! Привет, мир. 48/2 = <<48/2=24>>24\n\tcode: x = f(y) ✓"
    if tok.decode(tok.encode(sample).ids) != sample:
        problems.append("ordinary text does not round-trip through encode/decode")
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").exists():
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(p))
            text = hf.apply_chat_template(
                [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False
            )
            if text != "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n":
                problems.append(f"chat template renders {text!r}, not ChatML")
        except ImportError:
            problems.append("transformers is not installed, so the chat template could not be checked")
        except Exception as exc:  # transformers raises many types for a broken config
            problems.append(f"transformers cannot load the tokenizer or render its template: {exc}")
    return problems
