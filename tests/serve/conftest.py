"""Shared helpers for the serving tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


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
