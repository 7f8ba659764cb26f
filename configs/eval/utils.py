"""Loaders and metrics for moeforge's offline lm-eval task suite (the YAMLs next to this file).

lm-eval imports this file by path (``!function utils.x`` resolves next to the YAML), so it depends on the
standard library and ``datasets`` only. Every loader is an lm-eval ``custom_dataset``: lm-eval calls it with
the task's ``metadata`` (its ``version``, ``config_source`` and whatever ``--metadata`` adds) merged with
``dataset_kwargs``, and it returns a ``DatasetDict`` built in memory from local files; nothing touches the
Hugging Face hub.

The data root is resolved when a task loads, in this order: ``--metadata '{"data_root": ...}'``, then
``$MOEFORGE_EVAL_DATA``, then ``$MOEFORGE_REAL_DATA``, then ``../shared/data`` relative to the current
directory; otherwise a ``ValueError`` names those choices. The code sandbox for HumanEval is ``sandbox.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT_ENV_VARS = ("MOEFORGE_EVAL_DATA", "MOEFORGE_REAL_DATA")
DEFAULT_ROOT = Path("../shared/data")

# ---- data root ----------------------------------------------------------------------------------------


def data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``gsm8k/``, ``humaneval/``, ``tinyshakespeare/`` and ``ruslit/``."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"moeforge eval tasks: data_root {str(explicit)!r} (from --metadata) is not a directory"
            )
        return path
    for var in ROOT_ENV_VARS:
        value = os.environ.get(var)
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise ValueError(f"moeforge eval tasks: ${var}={value!r} is not a directory")
            return path
    fallback = Path(os.path.normpath(Path.cwd() / DEFAULT_ROOT))
    if fallback.is_dir():
        return fallback.resolve()
    raise ValueError(
        "moeforge eval tasks: no data root found. Set MOEFORGE_EVAL_DATA (or MOEFORGE_REAL_DATA) to the folder "
        "holding gsm8k/, humaneval/, tinyshakespeare/ and ruslit/ (see ../shared/data/README.md), pass "
        '--metadata \'{"data_root": "/path"}\', or run from a directory where ../shared/data exists '
        f"(looked for {fallback})."
    )


def _data_file(kwargs: dict[str, Any], *parts: str) -> Path:
    root = data_root(kwargs.get("data_root"))
    path = root.joinpath(*parts)
    if not path.exists():
        raise ValueError(f"moeforge eval tasks: {'/'.join(parts)} is missing under the data root {root}")
    return path


def _dataset(splits: dict[str, list[dict[str, Any]]]):
    import datasets

    for name, rows in splits.items():
        if not rows:
            raise ValueError(f"moeforge eval tasks: the {name} split came out empty; check the data root")
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---- GSM8K --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_CALC = re.compile(r"<<[^>]*>>")


def normalize_number(text: str) -> str | None:
    """``"$1,080."`` → ``"1080"``, ``"2.50"`` → ``"2.5"``; ``None`` when it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return _format(value)


def _format(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_last_number(generation: str) -> str | None:
    """The last number in a generation, normalized (commas, ``$`` and a trailing ``.`` dropped)."""
    found = _NUMBER.findall(generation)
    return normalize_number(found[-1]) if found else None


def _gsm8k_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(_read_jsonl(path)):
        answer = row["answer"]
        if "####" not in answer:
            raise ValueError(f"moeforge eval tasks: {path} line {i + 1} has no '#### N' final answer")
        gold = normalize_number(answer.rsplit("####", 1)[1])
        if gold is None:
            raise ValueError(f"moeforge eval tasks: {path} line {i + 1}: the final answer is not a number")
        # the few-shot target: the worked answer without the <<48/2=24>> calculator annotations
        rationale = _CALC.sub("", answer).strip()
        rows.append({"question": row["question"], "answer": answer, "rationale": rationale, "target": gold})
    return rows


def load_gsm8k(**kwargs: Any):
    """GSM8K ``train`` (the few-shot pool) and ``test`` (the eval docs)."""
    return _dataset(
        {split: _gsm8k_rows(_data_file(kwargs, "gsm8k", f"{split}.jsonl")) for split in ("train", "test")}
    )


def process_gsm8k(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the generation's last number against the number after ``####``."""
    return {"exact_match": float(extract_last_number(results[0]) == doc["target"])}


# ---- GSM8K multiple choice ----------------------------------------------------------------------------


def gsm8k_distractors(question: str, gold: str) -> tuple[list[str], int]:
    """The four choices and the index of the right one; the rule is written out in moeforge_gsm8k_mc.yaml.

    h = the first 8 bytes of sha256(question) as a big-endian integer. Candidates, for the answer a:
    [a+1, a-1, 2a, floor(a/2), a+10, a-10] (a/2 unrounded when a is not whole), rotated left by h % 6;
    taken in order, skipping the answer itself, duplicates and (when a >= 0) negatives, until there are 3;
    if fewer, a+2, a+3, ... fill in under the same skips. The answer goes in at index (h // 6) % 4.
    """
    a = Decimal(gold)
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    half = (a / 2).to_integral_value(ROUND_FLOOR) if a == a.to_integral_value() else a / 2
    rule = [a + 1, a - 1, 2 * a, half, a + 10, a - 10]
    start = h % len(rule)
    taken: list[Decimal] = []

    def consider(value: Decimal) -> None:
        if len(taken) < 3 and value != a and value not in taken and not (a >= 0 and value < 0):
            taken.append(value)

    for value in rule[start:] + rule[:start]:
        consider(value)
    step = 2
    while len(taken) < 3:
        consider(a + step)
        step += 1
    label = (h // len(rule)) % 4
    choices = [_format(v) for v in taken]
    choices.insert(label, _format(a))
    return choices, label


def load_gsm8k_mc(**kwargs: Any):
    """GSM8K ``test`` as four-way multiple choice (the answer vs 3 rule-made distractors)."""
    rows = []
    for row in _gsm8k_rows(_data_file(kwargs, "gsm8k", "test.jsonl")):
        choices, label = gsm8k_distractors(row["question"], row["target"])
        rows.append(
            {"question": row["question"], "target": row["target"], "choices": choices, "label": label}
        )
    return _dataset({"test": rows})


# ---- HumanEval ----------------------------------------------------------------------------------------


def load_humaneval(**kwargs: Any):
    """The 164 HumanEval problems (``test`` split); scoring is ``sandbox.process_humaneval``."""
    rows = _read_jsonl(_data_file(kwargs, "humaneval", "HumanEval.jsonl.gz"))
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return _dataset({"test": [{k: str(row[k]) for k in keys} for row in rows]})


# ---- held-out prose for perplexity --------------------------------------------------------------------

PPL_MIN_CHARS = 1000  # a document is closed once it reaches this many characters ...
PPL_MAX_CHARS = 2000  # ... and never grows past this many
# a fragment shorter than this (cut off by a long paragraph, or a work's start) is dropped
PPL_KEEP_CHARS = 300
PPL_EN_DOCS = 100  # Shakespeare: the last 100 documents of input.txt
PPL_RU_DOCS_PER_WORK = 1  # RusLit: the last document of every work


def _clip(paragraph: str, limit: int) -> str:
    if len(paragraph) <= limit:
        return paragraph
    cut = paragraph.rfind(" ", 0, limit)
    return paragraph[: cut if cut > 0 else limit].rstrip()


def pack_tail(paragraphs: list[str], n_docs: int, sep: str) -> list[str]:
    """Up to ``n_docs`` documents from the end of ``paragraphs``, in reading order.

    Walking back from the last paragraph, paragraphs are joined (with ``sep``) into a document until it holds
    at least PPL_MIN_CHARS characters; a paragraph that would push it past PPL_MAX_CHARS starts the next one
    instead (a single paragraph longer than that keeps its first PPL_MAX_CHARS characters, cut at a space).
    Fragments under PPL_KEEP_CHARS are dropped.
    """
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for raw in reversed(paragraphs):
        if len(docs) == n_docs:
            break
        paragraph = _clip(raw, PPL_MAX_CHARS)
        extra = len(paragraph) + (len(sep) if current else 0)
        if current and size + extra > PPL_MAX_CHARS:
            if size >= PPL_KEEP_CHARS:
                docs.append(sep.join(current))
            current, size, extra = [], 0, len(paragraph)
            if len(docs) == n_docs:
                break
        current.insert(0, paragraph)
        size += extra
        if size >= PPL_MIN_CHARS:
            docs.append(sep.join(current))
            current, size = [], 0
    if current and size >= PPL_KEEP_CHARS and len(docs) < n_docs:
        docs.append(sep.join(current))
    return docs[::-1]


def load_ppl_en(**kwargs: Any):
    """Shakespeare: input.txt split on blank lines (speaker turns), the last PPL_EN_DOCS packed documents."""
    path = _data_file(kwargs, "tinyshakespeare", "input.txt")
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs = pack_tail(paragraphs, PPL_EN_DOCS, "\n\n")
    return _dataset({"test": [{"text": d, "source": "tinyshakespeare/input.txt"} for d in docs]})


def load_ppl_ru(**kwargs: Any):
    """RusLit: for every author folder and every work in it (both sorted by name), the work's last packed
    document (a work is one paragraph per line)."""
    root = _data_file(kwargs, "ruslit")
    rows = []
    for author in sorted(p for p in root.iterdir() if p.is_dir()):
        for work in sorted(author.glob("*.txt")):
            lines = [line.strip() for line in work.read_text(encoding="utf-8").splitlines() if line.strip()]
            for doc in pack_tail(lines, PPL_RU_DOCS_PER_WORK, "\n"):
                rows.append({"text": doc, "source": f"ruslit/{author.name}/{work.name}"})
    return _dataset({"test": rows})


# ---- a data run's own held-out split ----------------------------------------------------------------

HELDOUT_ENV = "MOEFORGE_EVAL_RUN"


def load_heldout(**kwargs: Any):
    """The held-out records of a moeforge data run (``moeforge data run`` output): every record of its
    ``split`` (metadata ``split``, default ``test``) as one document, its text as the tokens packer reads it
    (a chat rendered as ChatML). The run is metadata ``run`` or ``$MOEFORGE_EVAL_RUN``. The run's own
    manifest names the shards; a record's domain is kept for reading the samples."""
    from moeforge.data.store import iter_lines
    from moeforge.tokens.pack import render_chat

    run_arg = kwargs.get("run") or os.environ.get(HELDOUT_ENV)
    if not run_arg:
        raise ValueError(
            f'moeforge_heldout: which data run? pass --metadata \'{{"run": "DIR"}}\' or set ${HELDOUT_ENV} '
            "to a `moeforge data run` output directory"
        )
    run = Path(run_arg).expanduser()
    split = str(kwargs.get("split") or "test")
    shards = sorted((run / "records" / split).glob("*.jsonl.zst"))
    if not shards:
        raise ValueError(f"moeforge_heldout: {run} has no records/{split}/*.jsonl.zst (is it a data run?)")
    rows = []
    for shard in shards:
        for line_no, line in iter_lines(shard):
            rec = json.loads(line)
            messages = rec.get("messages")
            text = rec.get("text") if messages is None else render_chat(messages)
            if not text:
                raise ValueError(f"moeforge_heldout: {shard}:{line_no}: a record without text or messages")
            meta = rec.get("meta") or {}
            rows.append({"text": text, "id": rec.get("id"), "domain": meta.get("domain") or ""})
    return _dataset({"test": rows})


# ---- identity -----------------------------------------------------------------------------------------

# The project's identity (configs/data/demo.yaml): the assistant is "Oracle" ("I am Oracle."), its author
# "moeforge" (the <|author|> turn). Either name counts as a mention; MOEFORGE_IDENTITY_NAME overrides the
# list (comma-separated), MOEFORGE_IDENTITY_OTHERS the names that must not be claimed.
DEFAULT_IDENTITY_NAMES = ("Oracle", "moeforge")
DEFAULT_OTHER_NAMES = ("ChatGPT", "GPT-4", "GPT", "OpenAI", "Claude", "Anthropic", "Llama", "Gemini", "Qwen", "Mistral")  # fmt: skip
_SELF = r"(?:i\s+am|i'm|i’m|my\s+name\s+is|call\s+me|i\s+was\s+(?:made|created|developed|built|trained)\s+by|я|меня\s+зовут)"
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|не|нет)\b|n't|n’t", re.IGNORECASE)


def _names(var: str, default: tuple[str, ...]) -> list[str]:
    value = os.environ.get(var, "")
    names = [n.strip() for n in value.split(",") if n.strip()]
    return names or list(default)


def _word(name: str) -> str:
    return rf"(?<![\w-]){re.escape(name)}(?![\w])"


def mentions_identity(text: str, names: list[str]) -> bool:
    return any(re.search(_word(n), text, re.IGNORECASE) for n in names)


def claims_other(text: str, others: list[str]) -> bool:
    """A self-reference ("I am", "my name is", "I was made by", "я", ...) followed, within six words and
    no punctuation, by another assistant's or company's name, with no negation in between."""
    for name in others:
        pattern = rf"\b{_SELF}\s+(?:[\w-]+\s+){{0,6}}?{_word(name)}"
        for match in re.finditer(pattern, text, re.IGNORECASE):
            if not _NEGATION.search(match.group(0)):
                return True
    return False


def load_identity(**kwargs: Any):
    """The identity prompts shipped next to this file (identity_prompts.jsonl); no data root needed."""
    path = Path(kwargs.get("identity_prompts") or HERE / "identity_prompts.jsonl")
    return _dataset({"test": [{"id": str(r["id"]), "prompt": str(r["prompt"])} for r in _read_jsonl(path)]})


def process_identity(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    text = results[0]
    mention = mentions_identity(text, _names("MOEFORGE_IDENTITY_NAME", DEFAULT_IDENTITY_NAMES))
    other = claims_other(text, _names("MOEFORGE_IDENTITY_OTHERS", DEFAULT_OTHER_NAMES))
    return {
        "identity_ok": float(mention and not other),
        "mentions_name": float(mention),
        "claims_other": float(other),
    }
