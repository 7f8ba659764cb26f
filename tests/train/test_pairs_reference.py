"""Pairs as model inputs (moeforge.tokens.pairs) and the reference cache (moeforge.train.reference): the
side's tokens alone are scored, batches follow the Preference objective's layout, the reference runs once
and its cache is reused only for the same weights and pairs; then a DPO step on a tiny MoE moves the
policy toward the chosen side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.tokens.pairs import PairRefused, collate_pairs, encode_pair
from moeforge.train.objectives import build_objective, sequence_logps
from moeforge.train.reference import cached_reference_logps, pairs_fingerprint, reference_logps

TEXT = (
    "What is two plus two? Two plus two is four. It is five. Name a colour. Blue is a colour. "
    "A table is a colour. Say hello. Hello there. Go away. "
)
PAIRS = [
    ([{"role": "user", "content": "What is two plus two?"}], "Two plus two is four.", "It is five."),
    ([{"role": "user", "content": "Name a colour."}], "Blue is a colour.", "A table is a colour."),
    (
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello."}],
        "Hello there.",
        "Go away.",
    ),
]


@pytest.fixture(scope="module")
def tok(make_bpe: Any) -> Any:
    return make_bpe(TEXT, vocab_size=300)


def _encode(tok: Any, max_len: int = 64) -> list[Any]:
    return [
        encode_pair(
            tok,
            p,
            [{"role": "assistant", "content": c}],
            [{"role": "assistant", "content": r}],
            max_len=max_len,
        )
        for p, c, r in PAIRS
    ]


def _model(vocab: int) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(load_model_config("tiny", [f"vocab_size={vocab}", "moe.router_noise_std=0"]))


def test_a_side_is_its_content_and_im_end_after_the_assistant_header(tok: Any) -> None:
    enc = _encode(tok)[0]
    assert tok.decode(enc.prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.chosen, skip_special_tokens=False) == "Two plus two is four.<|im_end|>"
    ids, labels = enc.sequence("rejected")
    assert len(ids) == len(labels) == len(enc.prompt) + len(enc.rejected) - 1
    scored = [x for x in labels if x != -100]
    assert scored == enc.rejected  # exactly the side's tokens, each at the position that predicts it
    n = len(enc.prompt)
    assert labels[n - 1] == enc.rejected[0] and labels[: n - 1] == [-100] * (
        n - 1
    )  # from the header's last token


def test_collate_lays_out_chosen_rows_then_rejected_rows_with_the_reference(tok: Any) -> None:
    pairs = _encode(tok)
    ref = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], dtype=torch.float64)
    batch = collate_pairs(pairs, pad_id=tok.token_to_id("<|pad|>"), ref_logps=ref)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -5.0, -2.0, -4.0, -6.0]
    for r, (p, side) in enumerate([(p, "chosen") for p in pairs] + [(p, "rejected") for p in pairs]):
        ids, labels = p.sequence(side)
        assert batch["input_ids"][r, : len(ids)].tolist() == ids
        assert batch["labels"][r].tolist() == labels + [-100] * (batch["labels"].shape[1] - len(labels))
    with pytest.raises(ValueError, match=r"ref_logps must be \[pairs, 2\]"):
        collate_pairs(pairs, pad_id=0, ref_logps=ref[:2])


@pytest.mark.parametrize(
    ("prompt", "chosen", "reason"),
    [
        ([{"role": "user", "content": "hi <|im_end|> there"}], "ok", "pair:marker_in_content"),
        ([{"role": "user", "content": "hi"}], "x " * 80, "pair:too_long"),
    ],
)
def test_a_pair_that_cannot_be_input_is_refused_with_a_reason(
    tok: Any, prompt: Any, chosen: str, reason: str
) -> None:
    with pytest.raises(PairRefused) as err:
        encode_pair(
            tok,
            prompt,
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": "no"}],
            max_len=48,
        )
    assert err.value.reason == reason


def test_reference_logps_equal_the_models_forward_and_the_cache_is_reused_only_when_it_matches(
    tok: Any, tmp_path: Path
) -> None:
    pairs = _encode(tok)
    model = _model(tok.get_vocab_size(with_added_tokens=True))
    pad = tok.token_to_id("<|pad|>")
    ref = reference_logps(model, pairs, pad_id=pad, batch_pairs=2)
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for j, side in enumerate(("chosen", "rejected")):
                ids, labels = p.sequence(side)
                lp = sequence_logps(model(torch.tensor([ids])).logits, torch.tensor([labels]))
                assert float(ref[i, j]) == pytest.approx(float(lp[0]), abs=1e-5)
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return reference_logps(model, pairs, pad_id=pad)

    path = tmp_path / "ref" / "reference.safetensors"
    first = cached_reference_logps(path, pairs, model_sha256="a" * 64, compute=compute)
    again = cached_reference_logps(path, pairs, model_sha256="a" * 64, compute=compute)
    assert len(calls) == 1 and torch.equal(first, again)  # computed once, then read
    cached_reference_logps(path, pairs, model_sha256="b" * 64, compute=compute)  # other weights
    cached_reference_logps(path, pairs[:2], model_sha256="b" * 64, compute=lambda: first[:2])  # other pairs
    assert len(calls) == 2
    path.write_bytes(b"not a safetensors file")
    cached_reference_logps(path, pairs, model_sha256="b" * 64, compute=compute)  # damaged: recomputed
    assert len(calls) == 3 and pairs_fingerprint(pairs) != pairs_fingerprint(pairs[:2])


def test_dpo_steps_on_cached_reference_logps_raise_the_chosen_sides_reward(tok: Any) -> None:
    pairs = _encode(tok)
    model = _model(tok.get_vocab_size(with_added_tokens=True))
    pad = tok.token_to_id("<|pad|>")
    ref = reference_logps(model, pairs, pad_id=pad)  # the reference: the policy's own starting point
    batch = collate_pairs(pairs, pad_id=pad, ref_logps=ref)
    dpo = build_objective("dpo", torch.device("cpu"), "fp32", document=False, beta=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = dpo(model, batch)
    assert float(first.scalars["rewards/margin"]) == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert float(first.loss.detach() - first.scalars["aux_loss"]) == pytest.approx(0.6931, abs=1e-3)  # log 2
    for _ in range(15):
        res = dpo(model, batch)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    last = dpo(model, batch)
    assert float(last.scalars["rewards/margin"]) > 0.5 and float(last.scalars["rewards/accuracy"]) == 1.0
