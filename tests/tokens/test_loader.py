"""The token loader: exact labels, padding, document ids and positions; deterministic rank-aware sampling;
resuming from a JSON state yields the batches an uninterrupted run would; mixtures follow their weights."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moeforge.tokens.loader import TokenDataset, TokenLoader
from moeforge.tokens.sampling import MixtureSampler, ResumableSampler
from moeforge.tokens.shards import IndexedShardWriter, ShardError

PAD = 3


def make_dir(
    path: Path,
    samples: list[list[list[int]]],
    *,
    seq_len: int = 8,
    masks: list[list[list[int]]] | None = None,
    domains: list[int] | None = None,
    names: tuple[str, ...] = ("code", "math", "prose"),
    split: str = "train",
) -> Path:
    """A token directory as the packer writes it: one split's shard plus manifest.json."""
    path.mkdir(parents=True, exist_ok=True)
    with IndexedShardWriter(path / split, np.uint16, loss_mask=masks is not None, domains=True) as w:
        for i, sample in enumerate(samples):
            for j, seg in enumerate(sample):
                w.add_segment(seg, masks[i][j] if masks is not None else None)
            w.end_sample(domains[i] if domains is not None else 0)
    manifest = {
        "format": "moeforge.tokens/1",
        "seq_len": seq_len,
        "mode": "sft" if masks is not None else "pretrain",
        "tokenizer": {"pad_id": PAD, "eos_id": 2, "vocab_size": 1000, "sha256": "0" * 64},
        "domains": list(names),
        "splits": {split: {"prefix": split, "samples": len(samples)}},
    }
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return path


def numbered(n: int, seq_len: int = 8, base: int = 100) -> list[list[list[int]]]:
    """``n`` samples whose first token is ``base + i`` (so a batch row names its sample), of varied shape."""
    out = []
    for i in range(n):
        length = 2 + i % (seq_len)  # 2..seq_len+1 tokens
        toks = [base + i] + [10 + (i + k) % 50 for k in range(length - 1)]
        cut = 1 + i % (length - 1)
        out.append([toks[:cut], toks[cut:]] if i % 3 else [toks])
    return out


def first_tokens(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_item_fields_exactly(tmp_path: Path) -> None:
    d = make_dir(
        tmp_path / "sft",
        [[[10, 11, 12], [13, 14]], [[20, 21, 22, 23, 24, 25, 26, 27, 28]]],
        masks=[[[0, 1, 1], [0, 1]], [[1] * 9]],
        domains=[2, 1],
    )
    ds = TokenDataset(d, "train")
    assert len(ds) == 2 and ds.seq_len == 8 and ds.pad_id == PAD and ds.domains == ["code", "math", "prose"]
    item = ds[0]
    P = PAD
    assert item["input_ids"].tolist() == [10, 11, 12, 13, 14, P, P, P]
    # labels[t] is token t+1 when it is real and its mask bit is 1
    assert item["labels"].tolist() == [11, 12, -100, 14, -100, -100, -100, -100]
    assert item["doc_ids"].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert item["positions"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert item["domain"].item() == 2 and item["domain"].dim() == 0
    assert all(v.dtype == torch.long for v in item.values())
    full = ds[1]  # seq_len + 1 tokens: no padding at all
    assert full["input_ids"].tolist() == [20, 21, 22, 23, 24, 25, 26, 27]
    assert full["labels"].tolist() == [21, 22, 23, 24, 25, 26, 27, 28]
    assert full["doc_ids"].tolist() == [0] * 8 and full["positions"].tolist() == list(range(8))
    assert ds[-1]["domain"].item() == 1
    with pytest.raises(IndexError):
        ds[2]


def test_pretrain_labels_only_drop_padding(tmp_path: Path) -> None:
    ds = TokenDataset(make_dir(tmp_path / "pt", [[[7, 8], [9]]]), "train")
    item = ds[0]
    assert item["labels"].tolist() == [8, 9] + [-100] * 6
    assert item["doc_ids"].tolist() == [0, 0, 1] + [-1] * 5
    assert item["positions"].tolist() == [0, 1, 0, 0, 1, 2, 3, 4]


def test_item_from_a_non_contiguous_megatron_layout(tmp_path: Path) -> None:
    d = make_dir(tmp_path / "nc", [[[1]], [[1]]])  # manifest and sidecars; the shard is replaced below
    (d / "train.dom").unlink()
    bins = np.array([30, 31, 10, 11, 12, 20], dtype="<u2")
    lengths, pointers = np.array([3, 1, 2], dtype="<i4"), np.array([4, 10, 0], dtype="<i8")
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 3)
    idx = header + lengths.tobytes() + pointers.tobytes() + np.array([0, 2, 3], dtype="<i8").tobytes()
    (d / "train.idx").write_bytes(idx)
    (d / "train.bin").write_bytes(bins.tobytes())
    item = TokenDataset(d, "train")[0]
    assert item["input_ids"].tolist() == [10, 11, 12, 20, PAD, PAD, PAD, PAD]
    assert item["doc_ids"].tolist() == [0, 0, 0, 1, -1, -1, -1, -1]
    assert item["labels"].tolist() == [11, 12, 20] + [-100] * 5


def test_batches_equal_stacked_items_across_mixed_datasets(tmp_path: Path) -> None:
    a = TokenDataset(make_dir(tmp_path / "a", numbered(13), domains=[i % 3 for i in range(13)]), "train")
    b_samples = numbered(7, base=500)
    masks = [[[(t + k) % 2 for k, t in enumerate(seg)] for seg in s] for s in b_samples]
    b = TokenDataset(make_dir(tmp_path / "b", b_samples, masks=masks, names=("math",)), "train")
    loader = TokenLoader([a, b], batch_size=5, seed=3, weights=[0.5, 0.5])
    for _ in range(6):
        batch = loader.next_batch()
        assert {k: tuple(v.shape) for k, v in batch.items()} == {
            "input_ids": (5, 8), "labels": (5, 8), "doc_ids": (5, 8), "positions": (5, 8), "domain": (5,),
        }  # fmt: skip
        for row, first in enumerate(first_tokens(batch)):
            ds, i = (a, first - 100) if first < 500 else (b, first - 500)
            item = ds[i]
            for key in ("input_ids", "labels", "doc_ids", "positions"):
                assert torch.equal(batch[key][row], item[key]), key
            # domains are renumbered to the loader's merged list: a's names, then b's new ones
            assert loader.domains[batch["domain"][row]] == ds.domains[item["domain"]]
    assert loader.domains == ["code", "math", "prose"]


def test_sampler_is_deterministic_per_seed_and_epoch() -> None:
    def order(seed: int, n: int = 40) -> list[int]:
        s = ResumableSampler(20, seed=seed)
        return s.take(n).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    first, second = order(1)[:20], order(1)[20:]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert ResumableSampler(5, seed=0, shuffle=False).take(7).tolist() == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize(
    ("n", "world", "drop_last", "per_rank"), [(12, 3, True, 4), (10, 3, True, 3), (10, 3, False, 4)]
)
def test_ranks_partition_an_epoch(n: int, world: int, drop_last: bool, per_rank: int) -> None:
    shares = [
        ResumableSampler(n, seed=7, rank=r, world_size=world, drop_last=drop_last) for r in range(world)
    ]
    epochs = [s.take(per_rank).tolist() for s in shares]
    assert all(len(e) == per_rank == len(s) for e, s in zip(epochs, shares, strict=True))
    flat = [i for e in epochs for i in e]
    if drop_last:
        assert len(set(flat)) == len(flat) == per_rank * world  # disjoint; the tail is dropped
    else:
        assert set(flat) == set(range(n))  # wrapped: everything once, a few twice
    if n % world == 0:
        assert sorted(flat) == list(range(n))
    assert all(s.state_dict() == shares[0].state_dict() for s in shares)  # one state fits every rank


def test_sampler_rejects_bad_setups() -> None:
    with pytest.raises(ValueError, match="drop_last"):
        ResumableSampler(2, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank 4"):
        ResumableSampler(10, seed=0, rank=4, world_size=4)
    s = ResumableSampler(10, seed=0)
    with pytest.raises(ValueError, match="seed=0 but this sampler has 1"):
        ResumableSampler(10, seed=1).load_state_dict(s.state_dict())


def loaders(tmp_path: Path, rank: int = 0, world: int = 1) -> TokenLoader:
    a = make_dir(tmp_path / "a", numbered(11), domains=[i % 3 for i in range(11)])
    b = make_dir(tmp_path / "b", numbered(6, base=500))
    datasets = [TokenDataset(a, "train"), TokenDataset(b, "train")]
    return TokenLoader(datasets, batch_size=3, seed=11, weights=[0.7, 0.3], rank=rank, world_size=world)


@pytest.mark.parametrize("world", [1, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path: Path, world: int) -> None:
    for rank in range(world):
        straight = loaders(tmp_path, rank, world)
        reference = [straight.next_batch() for _ in range(17)]  # several epochs of both datasets

        first = loaders(tmp_path, rank, world)
        taken = [batch for _, batch in zip(range(7), first, strict=False)]
        assert torch.equal(taken[-1]["input_ids"], reference[6]["input_ids"])
        state = json.loads(json.dumps(first.state_dict()))

        resumed = loaders(tmp_path, rank, world)
        resumed.load_state_dict(state)
        for want in reference[7:]:
            got = resumed.next_batch()
            for key in want:
                assert torch.equal(got[key], want[key]), key


def test_resume_across_an_epoch_boundary(tmp_path: Path) -> None:
    ds = TokenDataset(make_dir(tmp_path / "d", numbered(10)), "train")
    straight = TokenLoader(ds, batch_size=4, seed=5)
    reference = [first_tokens(straight.next_batch()) for _ in range(6)]
    first = TokenLoader(ds, batch_size=4, seed=5)
    first.next_batch(), first.next_batch()  # 8 of 10 samples: the next batch straddles epochs 0 and 1
    resumed = TokenLoader(ds, batch_size=4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [first_tokens(resumed.next_batch()) for _ in range(4)] == reference[2:]
    epoch0 = [t for b in reference for t in b][:10]
    assert sorted(epoch0) == list(range(100, 110))


def test_mixture_follows_weights_and_is_deterministic() -> None:
    def draws(seed: int) -> np.ndarray:
        m = MixtureSampler([300, 50], [0.8, 0.2], seed=seed)
        comp, idx = m.take(5000)
        assert idx[comp == 1].max() < 50 and idx[comp == 0].max() < 300
        return comp

    comp = draws(1)
    assert abs((comp == 0).mean() - 0.8) < 0.03
    assert np.array_equal(comp, draws(1))
    assert Counter(comp[:10].tolist()) == {0: 8, 1: 2}  # every 10 draws hold the exact mixture
    m1, m2 = MixtureSampler([300, 50], [0.8, 0.2], seed=1), MixtureSampler([300, 50], [0.8, 0.2], seed=2)
    assert not np.array_equal(m1.take(100)[1], m2.take(100)[1])  # the seed shuffles within components


def test_mixture_state_round_trip() -> None:
    m = MixtureSampler([30, 7, 5], [0.5, 0.3, 0.2], seed=4)
    m.take(123)
    state = json.loads(json.dumps(m.state_dict()))
    want = m.take(200)
    again = MixtureSampler([30, 7, 5], [0.5, 0.3, 0.2], seed=4)
    again.load_state_dict(state)
    got = again.take(200)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="has 3 datasets but this mixture has 2"):
        MixtureSampler([30, 7], seed=4).load_state_dict(state)


def test_domain_labels_come_through(tmp_path: Path) -> None:
    doms = [2, 0, 1, 2, 2]
    ds = TokenDataset(make_dir(tmp_path / "d", numbered(5), domains=doms), "train")
    loader = TokenLoader(ds, batch_size=5, seed=0)
    batch = loader.next_batch()
    assert [doms[t - 100] for t in first_tokens(batch)] == batch["domain"].tolist()
    assert loader.domains == ["code", "math", "prose"]


def test_epoch_batches_cover_each_rank_share_once(tmp_path: Path) -> None:
    ds = TokenDataset(make_dir(tmp_path / "d", numbered(11)), "train")
    seen = []
    for rank in range(3):
        loader = TokenLoader(ds, batch_size=2, seed=0, rank=rank, world_size=3)
        before = loader.state_dict()
        batches = list(loader.epoch_batches())
        assert [len(b["domain"]) for b in batches][:-1] == [2] * (len(batches) - 1)
        mine = [t - 100 for b in batches for t in first_tokens(b)]
        assert mine == list(range(rank, 11, 3))
        seen += mine
        assert loader.state_dict() == before
    assert sorted(seen) == list(range(11))


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenDataset(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        TokenDataset(tmp_path / "empty", "train")
    d = make_dir(tmp_path / "d", numbered(4))
    with pytest.raises(ShardError, match=r"no split 'valid'; it has \['train'\]"):
        TokenDataset(d, "valid")
    long = make_dir(tmp_path / "long", [[list(range(10, 20))]], seq_len=8)
    with pytest.raises(ShardError, match="10 tokens"):
        TokenDataset(long, "train")
    other = make_dir(tmp_path / "other", numbered(4, seq_len=4), seq_len=4)
    with pytest.raises(ValueError, match="share seq_len"):
        TokenLoader([TokenDataset(d, "train"), TokenDataset(other, "train")], batch_size=2, seed=0)
