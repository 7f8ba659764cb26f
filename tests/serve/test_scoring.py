"""Scoring (moeforge.serve.scoring): every token's log-probability equals the model's own full forward
(log-softmax of its logits), batched or alone, with shared contexts computed once or not, and for every
model feature; bad input is refused with a message."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.serve.scoring import score_sequences

VARIANTS = {
    "moe top-2": [],
    "dense": ["moe=null"],
    "capacity factor": ["moe.capacity_factor=1.0"],
    "aux-free bias, ghosts": ["moe.aux_free_bias_rate=0.01", "moe.num_ghost_experts=2"],
}


def _model(overrides: list[str]) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(load_model_config("tiny", overrides)).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=0.5)
    return model


def _reference(model: MoETransformer, seq: list[int], start: int) -> tuple[list[float], list[bool]]:
    with torch.no_grad():  # the input is every token but the last, which is only a target (as lm-eval's hf)
        logits = model(torch.tensor([seq[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    lps = [float(logp[p - 1, seq[p]]) for p in range(start, len(seq))]
    greedy = [int(logits[p - 1].argmax()) == seq[p] for p in range(start, len(seq))]
    return lps, greedy


def _seqs(vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(0, vocab, (20,), generator=g).tolist()
    seqs = [
        ctx + torch.randint(0, vocab, (n,), generator=g).tolist()  # one context, four continuations
        for n in (1, 3, 5, 2)
    ]
    starts = [len(ctx)] * 4
    short = torch.randint(0, vocab, (16,), generator=g).tolist()  # a second, shorter shared context
    seqs += [short + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 6, 2)]
    starts += [len(short)] * 3
    tiny = torch.randint(0, vocab, (2,), generator=g).tolist()  # shared, too short to run once: plain path
    seqs += [tiny + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 3)]
    starts += [len(tiny)] * 2
    seqs += [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (2, 17, 6)]  # unshared
    starts += [1, 1, 4]
    return seqs, starts


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("share", [True, False])
def test_scores_equal_the_full_forward(variant: str, share: bool) -> None:
    model = _model(VARIANTS[variant])
    seqs, starts = _seqs(model.cfg.vocab_size)
    got = score_sequences(model, seqs, starts, top_k=3, share_prefixes=share, max_batch_tokens=40)
    for seq, start, s in zip(seqs, starts, got, strict=True):
        lps, greedy = _reference(model, seq, start)
        assert s.ids == seq[start:] and s.start == start
        assert s.logprobs == pytest.approx(lps, abs=1e-5)
        assert s.greedy == greedy
        assert len(s.top) == len(lps)
        for row, lp in zip(s.top, s.logprobs, strict=True):
            assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1]
            assert lp <= row[0][1] + 1e-6
        assert s.is_greedy == all(greedy) and s.total == pytest.approx(sum(lps), abs=1e-4)


def test_only_contexts_long_enough_to_pay_are_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeforge.serve import scoring

    model = _model(VARIANTS[next(iter(VARIANTS))])
    seqs, starts = _seqs(model.cfg.vocab_size)
    ran: list[list[int]] = []
    real = scoring._run_chunk

    def spy(model, chunk, *args, **kwargs):  # type: ignore[no-untyped-def]
        ran.append(sorted(len(c) for c, _ in chunk))
        return real(model, chunk, *args, **kwargs)

    monkeypatch.setattr(scoring, "_run_chunk", spy)
    score_sequences(model, seqs, starts)
    assert sorted(n for chunk in ran for n in chunk) == [16, 20]  # the 2-token context went the plain way


def test_batching_and_sharing_change_nothing_beyond_rounding() -> None:
    model = _model([])
    seqs, starts = _seqs(model.cfg.vocab_size)
    alone = [
        score_sequences(model, [s], [st], share_prefixes=False)[0] for s, st in zip(seqs, starts, strict=True)
    ]
    together = score_sequences(model, seqs, starts)
    for a, b in zip(alone, together, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_a_start_at_the_end_scores_nothing_and_the_model_mode_is_kept() -> None:
    model = _model([]).train()
    (s,) = score_sequences(model, [[1, 2, 3]], 3)
    assert s.logprobs == [] and s.ids == [] and s.total == 0.0 and s.is_greedy
    assert model.training


@pytest.mark.parametrize(
    ("seqs", "starts", "match"),
    [
        ([[1, 2]], 0, "start must be in 1..2"),
        ([[1, 2]], 3, "start must be in 1..2"),
        ([[1, 10**6]], 1, "token ids outside"),
        ([list(range(258))], 1, "at most 257 tokens"),
    ],
)
def test_bad_input_is_refused_with_a_message(seqs: list[list[int]], starts: int, match: str) -> None:
    model = _model([])
    with pytest.raises(ValueError, match=match):
        score_sequences(model, seqs, starts)
