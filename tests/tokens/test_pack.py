"""Packing: pretraining blocks keep every token and the document boundaries; SFT masks exactly the
assistant turns, packs whole chats best-fit-decreasing, truncates at turn boundaries and counts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeforge.data.store import iter_lines
from moeforge.tokens.pack import PackStats, best_fit_decreasing, chat_spans, pack_records, render_chat
from moeforge.tokens.shards import IndexedShard, IndexedShardWriter
from moeforge.tokens.tokenize import tokenize_run
from moeforge.tokens.tokenizer import load_tokenizer, token_ids


def _records(run: Path, split: str = "train") -> list[dict]:
    out = []
    for f in sorted((run / "records" / split).glob("*.jsonl.zst")):
        out += [json.loads(line) for _, line in iter_lines(f)]
    return out


def _segments(shard: IndexedShard, i: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    tokens, mask, lengths = shard.sample(i)
    out, pos = [], 0
    for n in lengths:
        out.append((tokens[pos : pos + n], None if mask is None else mask[pos : pos + n]))
        pos += int(n)
    return out


# ---------------------------------------------------------------------------------------------- bin packing


def test_best_fit_decreasing_places_every_item_once_within_capacity() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 100, size=500)]
    bins = best_fit_decreasing(lengths, 100)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    lower_bound = -(-sum(lengths) // 100)
    assert len(bins) <= lower_bound * 11 // 9 + 1  # BFD's worst case is 11/9 OPT + 6/9
    assert best_fit_decreasing(lengths, 100) == bins  # deterministic


def test_best_fit_decreasing_picks_the_fullest_bin_that_fits() -> None:
    # 6 opens bin0 (rem 4), 5 opens bin1 (rem 5), 4 → fullest that fits is bin0 (rem 4 → 0), 3 → bin1
    assert best_fit_decreasing([4, 6, 3, 5], 10) == [[1, 0], [3, 2]]
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([11], 10)


# -------------------------------------------------------------------------------------------------- chats


def test_chat_rendering_matches_the_transformers_template(token_tokenizer: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(token_tokenizer))
    msgs = [
        {"role": "system", "content": "<|oracle_sys|>Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    assert render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False)
    text, spans, ends = chat_spans(msgs)
    assert text == render_chat(msgs)
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>", "6<|im_end|>"]
    assert ends == [text.index("4<|im_end|>") + 12, len(text)]  # after each assistant turn


def _pack(
    records: list[dict], tok_path: Path, tmp: Path, seq_len: int, mode: str
) -> tuple[PackStats, IndexedShard]:
    tok = load_tokenizer(tok_path)
    eos, _ = token_ids(tok)
    writer = IndexedShardWriter(tmp / "s", np.dtype(np.uint16), loss_mask=mode == "sft", domains=True)
    stats = pack_records(
        records, tok, writer, seq_len=seq_len, mode=mode, domains=["math", "prose"], eos_id=eos, batch_size=7
    )
    writer.close()
    return stats, IndexedShard(tmp / "s")


def test_sft_loss_mask_covers_exactly_the_assistant_turns(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    records = _records(token_run)
    chats = [r for r in records if r["messages"] is not None]
    stats, shard = _pack(chats, token_tokenizer, tmp_path, seq_len=256, mode="sft")
    tok = load_tokenizer(token_tokenizer)
    expected = sorted(
        "".join(m["content"] + "<|im_end|>" for m in r["messages"] if m["role"] == "assistant") for r in chats
    )
    got = []
    for i in range(len(shard)):
        for ids, mask in _segments(shard, i):
            assert mask is not None
            got.append(tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False))
            # the untrained part is exactly the system/user turns and the role headers
            assert "assistant\n" not in tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert sorted(got) == expected
    assert stats.records == len(chats) and stats.truncated == 0 and stats.dropped_too_long == 0
    assert stats.tokens == int(shard.sequence_lengths.sum())
    assert 0.5 < stats.efficiency <= 1.0
    assert stats.efficiency == pytest.approx(stats.tokens / (stats.samples * 257))


def test_identity_tokens_survive_as_single_ids(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    chats = [r for r in _records(token_run) if r["messages"] is not None]
    _, shard = _pack(chats, token_tokenizer, tmp_path, seq_len=256, mode="sft")
    tok = load_tokenizer(token_tokenizer)
    ids = np.concatenate([shard.sample(i)[0] for i in range(len(shard))])
    sys_id, intro_id = tok.token_to_id("<|oracle_sys|>"), tok.token_to_id("<|oracle_intro|>")
    n_intro = sum(1 for r in chats if "<|oracle_intro|>" in r["messages"][-1]["content"])
    assert int((ids == sys_id).sum()) == len(chats)
    assert int((ids == intro_id).sum()) == n_intro > 0


def test_sft_packs_whole_chats_without_splitting(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    chats = [r for r in _records(token_run) if r["messages"] is not None]
    _, shard = _pack(chats, token_tokenizer, tmp_path, seq_len=256, mode="sft")
    tok = load_tokenizer(token_tokenizer)
    rendered = sorted(render_chat(r["messages"]) for r in chats)
    segs = sorted(
        tok.decode(ids.tolist(), skip_special_tokens=False)
        for i in range(len(shard))
        for ids, _ in _segments(shard, i)
    )
    assert segs == rendered
    assert all(len(shard.sample(i)[0]) <= 257 for i in range(len(shard)))


def test_plain_text_in_an_sft_run_is_trained_in_full_in_block_sized_pieces(
    token_tokenizer: Path, tmp_path: Path
) -> None:
    chat = {
        "id": "c",
        "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "text": None,
        "meta": {"domain": "math"},
    }
    long_text = " ".join(f"word{i}" for i in range(300))
    plain = [{"id": f"p{i}", "text": t, "messages": None, "meta": {"domain": "math"}}
             for i, t in enumerate(["A short plain note.", long_text, "Another one."])]  # fmt: skip
    _, shard = _pack([plain[0], chat, plain[1], plain[2]], token_tokenizer, tmp_path, seq_len=63, mode="sft")
    tok = load_tokenizer(token_tokenizer)
    eos, _ = token_ids(tok)
    segs = [seg for i in range(len(shard)) for seg in _segments(shard, i)]
    assert all(len(ids) <= 64 for ids, _ in segs)
    # the plain documents' tokens (each + EOS) all come back, every one of them trained on
    plain_segs = [
        (ids, mask)
        for ids, mask in segs
        if "<|im_start|>" not in tok.decode(ids.tolist(), skip_special_tokens=False)
    ]
    assert all(mask is not None and mask.all() for _, mask in plain_segs)
    got = sorted(t for ids, _ in plain_segs for t in ids.tolist())
    want = sorted(t for p in plain for t in [*tok.encode(p["text"], add_special_tokens=False).ids, eos])
    assert got == want
    assert len(plain_segs) > len(plain)  # the long one was cut into pieces


def test_long_chats_are_cut_at_a_turn_boundary_and_counted(token_tokenizer: Path, tmp_path: Path) -> None:
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question number {i}: what is {i} times {i}?"},
                  {"role": "assistant", "content": f"{i} times {i} is {i * i}."}]  # fmt: skip
    long_chat = {"id": "a", "messages": turns, "text": None, "meta": {"domain": "math"}}
    hopeless = {
        "id": "b",
        "messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}],
        "text": None,
        "meta": {"domain": "math"},
    }
    stats, shard = _pack([long_chat, hopeless], token_tokenizer, tmp_path, seq_len=100, mode="sft")
    assert stats.truncated == 1 and stats.dropped_too_long == 1 and len(shard) == 1
    tok = load_tokenizer(token_tokenizer)
    ids, mask = _segments(shard, 0)[0]
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    full = render_chat(turns)
    assert full.startswith(text) and text.endswith("<|im_end|>\n") and len(ids) <= 101
    kept_turns = text.count("<|im_start|>")
    assert kept_turns % 2 == 0 and kept_turns >= 2  # whole user+assistant pairs, cut after an assistant turn
    assert mask is not None and mask.sum() > 0


def test_pretrain_blocks_keep_every_token_per_domain(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    records = _records(token_run)
    stats, shard = _pack(records, token_tokenizer, tmp_path, seq_len=64, mode="pretrain")
    tok = load_tokenizer(token_tokenizer)
    eos, _ = token_ids(tok)
    for dom_id, dom in enumerate(["math", "prose"]):
        docs = [r for r in records if r["meta"]["domain"] == dom]
        want = np.concatenate(
            [
                np.asarray(
                    [*tok.encode(r["text"] if r["text"] is not None else render_chat(r["messages"])).ids, eos]
                )
                for r in docs
            ]
        )
        samples = [i for i in range(len(shard)) if shard.domain(i) == dom_id]
        got = np.concatenate([shard.sample(i)[0] for i in samples])
        assert np.array_equal(got, want)
        assert all(len(shard.sample(i)[0]) == 65 for i in samples[:-1])  # only the last block is short
        assert stats.per_domain_samples[dom] == len(samples)
    assert not shard.has_loss_mask
    # a document boundary inside a block is a segment boundary: every segment but a block's last ends in EOS
    for i in range(len(shard)):
        segs = _segments(shard, i)
        assert all(int(ids[-1]) == eos for ids, _ in segs[:-1])


def test_tokenize_is_deterministic_and_writes_a_manifest(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    a = tokenize_run(token_run, token_tokenizer, seq_len=128, mode="sft", out=tmp_path / "a")
    b = tokenize_run(token_run, token_tokenizer, seq_len=128, mode="sft", out=tmp_path / "b")
    files_a = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(
        str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert "tokenizer/tokenizer.json" in files_a and "tokenizer/tokenizer_config.json" in files_a
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    m = a.manifest
    assert m["format"] == "moeforge.tokens/1" and m["mode"] == "sft" and m["seq_len"] == 128
    assert set(m["splits"]) == {"train", "valid", "test"} and m["domains"] == ["math", "prose"]
    assert {"train.bin", "train.idx", "train.mask", "train.dom"} <= set(m["splits"]["train"]["files"])
    assert b.manifest == m
    with pytest.raises(FileExistsError):
        tokenize_run(token_run, token_tokenizer, seq_len=128, out=tmp_path / "a")


def test_a_chat_one_newline_too_long_is_kept_without_the_newline(
    token_tokenizer: Path, tmp_path: Path
) -> None:
    tok = load_tokenizer(token_tokenizer)
    for k in range(1, 200):
        msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " x" * k}]
        if len(tok.encode(render_chat(msgs)).ids) == 66:
            break
    else:
        pytest.skip("no chat of exactly 66 tokens with this tokenizer")
    rec = {"id": "r", "messages": msgs, "text": None, "meta": {"domain": "math"}}
    stats, shard = _pack([rec], token_tokenizer, tmp_path, seq_len=64, mode="sft")
    assert (stats.samples, stats.truncated, stats.dropped_too_long) == (1, 1, 0)
    ids, mask = _segments(shard, 0)[0]
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == render_chat(msgs)[:-1]  # all but the "\n"
    assert mask is not None and int(mask[-1]) == 1


def test_the_tokenizer_learns_role_headers_as_single_tokens(token_tokenizer: Path) -> None:
    tok = load_tokenizer(token_tokenizer)
    assert tok.encode("<|im_start|>assistant\n").tokens[:2] == ["<|im_start|>", "assistant"]


def test_default_system_turn_opens_sft_chats_without_one_and_is_never_trained(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    """An imported model's template adds a system turn to chats that have none (SmolLM2's does): SFT
    renders chats the same way, and that turn is context (mask 0), like every non-assistant turn."""
    chats = [r for r in _records(token_run) if r["messages"] is not None][:20]
    for r in chats[::2]:  # half the chats lose their own system turn
        r["messages"] = [m for m in r["messages"] if m["role"] != "system"]
    tok = load_tokenizer(token_tokenizer)
    eos, _ = token_ids(tok)
    writer = IndexedShardWriter(tmp_path / "s", np.dtype(np.uint16), loss_mask=True, domains=True)
    pack_records(
        chats, tok, writer, seq_len=256, mode="sft", domains=["math", "prose"], eos_id=eos,
        default_system="You are a careful tutor.",
    )  # fmt: skip
    writer.close()
    shard = IndexedShard(tmp_path / "s")
    texts, trained = [], []
    for i in range(len(shard)):
        for ids, mask in _segments(shard, i):
            assert mask is not None
            texts.append(tok.decode(ids.tolist(), skip_special_tokens=False))
            trained.append(tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False))
    opened = [t for t in texts if t.startswith("<|im_start|>system\nYou are a careful tutor.<|im_end|>\n")]
    assert len(opened) == len(chats[::2])  # exactly the chats without a system turn of their own
    assert not any("careful tutor" in t for t in trained)
