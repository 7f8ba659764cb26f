"""The tokenizer: trained on a pipeline output, special tokens are single ids, deterministic bytes, a
ChatML template that transformers renders, and verify naming what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.tokens.tokenizer import (
    TokenizerConfig,
    TokenizerError,
    load_tokenizer,
    special_tokens,
    train_tokenizer,
    verify_tokenizer,
)

pytest.importorskip("tokenizers")
MOEFORGE = [sys.executable, "-m", "moeforge"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    src = root / "in.jsonl"
    rows = [
        {"question": f"Anna has {i} apples and buys {i + 3} more. How many apples? Привет {i}.",
         "answer": f"{i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3}\n#### {2 * i + 3}"}
        for i in range(400)
    ]  # fmt: skip
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = Recipe.model_validate(
        {
            "name": "tok",
            "sources": [{"path": str(src), "kind": "qa", "family": "f", "domain": "math"}],
            "langid": {"enabled": False},
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    run_pipeline(recipe, root / "run")
    return root / "run"


def test_every_special_token_is_one_id_and_round_trips(run_dir: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=400)
    out = train_tokenizer(run_dir, tmp_path / "tok", cfg)
    assert verify_tokenizer(out, cfg) == []
    tok = load_tokenizer(out)
    vocab = tok.get_vocab()
    for i, s in enumerate(special_tokens(cfg)):
        assert vocab[s] == i  # specials take the first ids, in order
        assert tok.encode(f"a{s}b").tokens.count(s) == 1
    assert "<|email|>" in vocab and "<|oracle_sys|>" in vocab and "<|im_start|>" in vocab
    text = "Anna has 7 apples, Привет! <<3+4=7>>7"
    assert tok.decode(tok.encode(text).ids) == text


def test_training_is_deterministic_to_the_byte(run_dir: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=400)
    a = train_tokenizer(run_dir, tmp_path / "a", cfg) / "tokenizer.json"
    b = train_tokenizer(run_dir, tmp_path / "b", cfg) / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()
    c = train_tokenizer(run_dir, tmp_path / "c", TokenizerConfig(vocab_size=420)) / "tokenizer.json"
    assert c.read_bytes() != a.read_bytes()


def test_transformers_loads_it_and_renders_chatml(run_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = train_tokenizer(run_dir, tmp_path / "tok", TokenizerConfig(vocab_size=400))
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "system", "content": "<|oracle_sys|>Be brief."}, {"role": "user", "content": "2+2?"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\n<|oracle_sys|>Be brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert hf.convert_tokens_to_ids("<|oracle_sys|>") in ids
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"


def test_verify_names_a_missing_special_token_and_the_cli_exits_1(run_dir: Path, tmp_path: Path) -> None:
    out = train_tokenizer(run_dir, tmp_path / "tok", TokenizerConfig(vocab_size=400, pii_tokens=False))
    problems = verify_tokenizer(out)  # checked against the default set, which has the PII placeholders
    assert any("<|email|>" in p and "missing" in p for p in problems)
    cli = subprocess.run(
        [*MOEFORGE, "tokenizer", "verify", str(out)], capture_output=True, text=True, check=False
    )
    assert cli.returncode == 1 and "<|email|>" in cli.stdout


def test_clear_errors_for_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no records/train"):
        train_tokenizer(tmp_path, tmp_path / "tok", TokenizerConfig(vocab_size=400))
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad)


def test_a_gpt2_style_vocab_and_merges_directory_loads(tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (gpt2 / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = load_tokenizer(gpt2)
    assert tok.encode("hello world").tokens[:2] == ["hello", "Ġw"]
    assert tok.decode(tok.encode("hello world, ünï").ids) == "hello world, ünï"
    assert tok.token_to_id("<|endoftext|>") == vocab["<|endoftext|>"]  # GPT-2's own EOS keeps its id
    for s in ("<|pad|>", "<|im_start|>", "<|im_end|>"):  # added so ChatML and padding work
        assert tok.encode(f"x{s}y").tokens.count(s) == 1
    base = TokenizerConfig(identity_tokens=[], pii_tokens=False)
    assert verify_tokenizer(gpt2, base) == []
    (gpt2 / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match=r"vocab\.json \+ merges\.txt"):
        load_tokenizer(gpt2)
