"""Indexed token shards: Megatron's MMIDIDX bytes exactly, atomic publication, and a reader that turns
every corrupt or truncated file into a ShardError naming it."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from moeforge.tokens.shards import IndexedShard, IndexedShardWriter, ShardError, token_dtype, verify_files

# Three samples; each is a list of segments (Megatron sequences).
SAMPLES = [[[5, 6, 7], [8, 9]], [[1]], [[2, 3], [4], [60_000, 0, 11]]]


def read_megatron(prefix: Path) -> dict:
    """Independent reader written from the format description (struct + np.fromfile), not our reader."""
    raw = prefix.with_name(prefix.name + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, "<i4", n_seq, off)
    pointers = np.frombuffer(raw, "<i8", n_seq, off + 4 * n_seq)
    docs = np.frombuffer(raw, "<i8", n_doc, off + 12 * n_seq)
    assert len(raw) == off + 12 * n_seq + 8 * n_doc
    dtype = {8: np.dtype("<u2"), 4: np.dtype("<i4")}[code]
    tokens = np.fromfile(prefix.with_name(prefix.name + ".bin"), dtype=dtype)
    return {
        "version": version,
        "code": code,
        "lengths": lengths,
        "pointers": pointers,
        "docs": docs,
        "tokens": tokens,
    }


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_independent_reader_sees_megatron_layout(tmp_path: Path, dtype: type, code: int) -> None:
    prefix = tmp_path / "train"
    with IndexedShardWriter(prefix, np.dtype(dtype)) as w:
        for sample in SAMPLES:
            for seg in sample:
                w.add_segment(seg)
            w.end_sample()
    got = read_megatron(prefix)
    segs = [seg for sample in SAMPLES for seg in sample]
    itemsize = np.dtype(dtype).itemsize
    assert got["version"] == 1 and got["code"] == code
    assert got["lengths"].tolist() == [len(s) for s in segs]
    assert got["pointers"].tolist() == (np.cumsum([0] + [len(s) for s in segs[:-1]]) * itemsize).tolist()
    assert got["docs"].tolist() == [0, 2, 3, 6]
    assert got["tokens"].tolist() == [t for s in segs for t in s]


def test_close_reports_counts_and_hashes_of_what_is_on_disk(tmp_path: Path) -> None:
    w = IndexedShardWriter(tmp_path / "s", np.uint16, loss_mask=True, domains=True)
    w.add_segment([1, 2], [1, 0])
    w.add_segment([3], [1])
    w.end_sample(2)
    info = w.close()
    assert (
        info["samples"] == 1 and info["segments"] == 2 and info["tokens"] == 3 and info["dtype"] == "uint16"
    )
    assert sorted(info["files"]) == ["s.bin", "s.dom", "s.idx", "s.mask"]
    assert verify_files(tmp_path, info["files"]) == []
    assert w.info == info
    assert info["files"]["s.bin"]["bytes"] == 6 and info["files"]["s.mask"]["bytes"] == 3


def test_round_trip_with_mask_and_domains(tmp_path: Path) -> None:
    prefix = tmp_path / "sft"
    with IndexedShardWriter(prefix, np.uint16, loss_mask=True, domains=True) as w:
        for i, sample in enumerate(SAMPLES):
            for seg in sample:
                w.add_segment(np.array(seg, dtype=np.int64), np.array([(t + i) % 2 for t in seg], dtype=bool))
            w.end_sample(domain=i + 1)
    shard = IndexedShard(prefix)
    assert len(shard) == 3 and shard.num_segments == 6 and shard.dtype == np.uint16
    assert shard.has_loss_mask and shard.has_domains
    for i, sample in enumerate(SAMPLES):
        tokens, mask, seg_lens = shard.sample(i)
        flat = [t for seg in sample for t in seg]
        assert tokens.tolist() == flat
        assert mask is not None and mask.tolist() == [(t + i) % 2 for t in flat]
        assert seg_lens.tolist() == [len(s) for s in sample]
        assert shard.domain(i) == i + 1
    assert shard.segment(5).tolist() == [60_000, 0, 11]
    assert shard.sample(0)[0].base is not None  # a view into the map, not a copy
    with pytest.raises(IndexError):
        shard.sample(3)


def test_without_sidecars_mask_is_none_and_domain_zero(tmp_path: Path) -> None:
    prefix = tmp_path / "p"
    with IndexedShardWriter(prefix, np.int32) as w:
        w.add_segment([70_000, 1])
        w.end_sample()
        info = w.close()  # closing inside the block is fine; the exit does not close twice
    assert info == w.info and sorted(info["files"]) == ["p.bin", "p.idx"]
    shard = IndexedShard(prefix)
    assert shard.sample(0)[0].tolist() == [70_000, 1] and shard.sample(0)[1] is None
    assert shard.domain(0) == 0 and not shard.has_loss_mask and not shard.has_domains


def test_rewrite_removes_stale_sidecars(tmp_path: Path) -> None:
    prefix = tmp_path / "p"
    with IndexedShardWriter(prefix, np.uint16, loss_mask=True, domains=True) as w:
        w.add_segment([1, 2], [1, 1])
        w.end_sample(1)
    with IndexedShardWriter(prefix, np.uint16) as w:
        w.add_segment([3, 4, 5])
        w.end_sample()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.bin", "p.idx"]
    assert IndexedShard(prefix).sample(0)[0].tolist() == [3, 4, 5]


def test_token_dtype_and_range_checks(tmp_path: Path) -> None:
    assert token_dtype(32_000) == np.uint16 and token_dtype(65_499) == np.uint16
    assert token_dtype(65_500) == np.int32 and token_dtype(150_000) == np.int32
    with IndexedShardWriter(tmp_path / "u", np.uint16) as w:
        with pytest.raises(ValueError, match=r"out of range for uint16.*max 65536"):
            w.add_segment([1, 65_536])
        with pytest.raises(ValueError, match="out of range"):
            w.add_segment([-1])
        with pytest.raises(ValueError, match="non-empty"):
            w.add_segment([])
        with pytest.raises(ValueError, match="takes no"):
            w.add_segment([1], [1])
        with pytest.raises(ValueError, match="empty sample"):
            w.end_sample()
        with pytest.raises(ValueError, match="without domains=True"):
            w.add_segment([1])
            w.end_sample(3)
        w.end_sample()
    with IndexedShardWriter(tmp_path / "m", np.uint16, loss_mask=True) as w:
        with pytest.raises(ValueError, match="requires"):
            w.add_segment([1, 2])
        with pytest.raises(ValueError, match="shape"):
            w.add_segment([1, 2], [1])
        with pytest.raises(ValueError, match="0 or 1"):
            w.add_segment([1, 2], [1, 2])


def test_exception_inside_with_leaves_no_files(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        IndexedShardWriter(tmp_path / "x", np.uint16, loss_mask=True, domains=True) as w,
    ):
        w.add_segment([1, 2, 3], [1, 1, 1])
        w.end_sample(1)
        raise RuntimeError("packing failed")
    assert list(tmp_path.iterdir()) == []


def test_close_with_an_unfinished_sample_writes_nothing(tmp_path: Path) -> None:
    w = IndexedShardWriter(tmp_path / "x", np.uint16)
    w.add_segment([1])
    with pytest.raises(ValueError, match="end_sample"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_empty_shard(tmp_path: Path) -> None:
    with IndexedShardWriter(tmp_path / "e", np.uint16, loss_mask=True, domains=True):
        pass
    shard = IndexedShard(tmp_path / "e")
    assert len(shard) == 0 and shard.num_segments == 0
    assert read_megatron(tmp_path / "e")["docs"].tolist() == [0]
    with pytest.raises(IndexError):
        shard.sample(0)


@pytest.fixture
def shard_prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "c"
    with IndexedShardWriter(prefix, np.uint16, loss_mask=True, domains=True) as w:
        for i, sample in enumerate(SAMPLES):
            for seg in sample:
                w.add_segment(seg, [1] * len(seg))
            w.end_sample(i)
    return prefix


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("c.idx", lambda b: b[:20], "truncated header"),
        ("c.idx", lambda b: b[:-5], "truncated or corrupt"),
        ("c.idx", lambda b: b + b"\0" * 8, "truncated or corrupt"),
        ("c.idx", lambda b: b"NOTMEGA\0\0" + b[9:], "magic"),
        ("c.idx", lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
        ("c.idx", lambda b: b[:17] + b"\x63" + b[18:], "dtype code 99"),
        ("c.idx", lambda b: b[:-8] + struct.pack("<q", 5), "document index"),
        ("c.bin", lambda b: b[:-4], "truncated"),
        ("c.bin", lambda b: b[:-1], "whole number"),
        ("c.mask", lambda b: b[:-1], "tokens"),
        ("c.dom", lambda b: b + b"\0\0", "samples"),
    ],
)
def test_corrupt_files_raise_shard_error_naming_the_file(
    shard_prefix: Path, file: str, damage, message: str
) -> None:
    path = shard_prefix.parent / file
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as err:
        IndexedShard(shard_prefix)
    assert file in str(err.value)


def test_pointer_past_end_of_bin_is_a_shard_error(shard_prefix: Path) -> None:
    idx = shard_prefix.with_name("c.idx")
    raw = bytearray(idx.read_bytes())
    n_seq = 6
    struct.pack_into("<q", raw, 34 + 4 * n_seq + 8 * (n_seq - 1), 1000)  # last pointer far past the end
    idx.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"c\.bin.*points up to byte"):
        IndexedShard(shard_prefix)


def test_missing_idx_means_unfinished(shard_prefix: Path) -> None:
    shard_prefix.with_name("c.idx").unlink()
    with pytest.raises(ShardError, match=r"c\.idx.*missing"):
        IndexedShard(shard_prefix)


def test_verify_files_finds_flipped_byte_and_missing_file(tmp_path: Path) -> None:
    w = IndexedShardWriter(tmp_path / "v", np.uint16, domains=True)
    w.add_segment(list(range(100)))
    w.end_sample(1)
    files = w.close()["files"]
    assert verify_files(tmp_path, files) == []
    data = bytearray((tmp_path / "v.bin").read_bytes())
    data[17] ^= 0x01
    (tmp_path / "v.bin").write_bytes(bytes(data))
    (tmp_path / "v.dom").unlink()
    problems = verify_files(tmp_path, files)
    assert len(problems) == 2
    assert any("v.bin" in p and "sha256" in p for p in problems)
    assert any("v.dom" in p and "missing" in p for p in problems)
    (tmp_path / "v.idx").write_bytes(b"short")
    assert any("v.idx" in p and "bytes" in p for p in verify_files(tmp_path, files))


def test_reader_accepts_a_non_contiguous_megatron_layout(tmp_path: Path) -> None:
    """Megatron allows sequences anywhere in the .bin; a sample is then gathered, not sliced."""
    bin_tokens = np.array([30, 31, 10, 11, 12, 20], dtype="<u2")
    lengths = np.array([3, 1, 2], dtype="<i4")
    pointers = np.array([2, 5, 0], dtype="<i8") * 2
    docs = np.array([0, 2, 3], dtype="<i8")
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 3)
    (tmp_path / "m.idx").write_bytes(header + lengths.tobytes() + pointers.tobytes() + docs.tobytes())
    (tmp_path / "m.bin").write_bytes(bin_tokens.tobytes())
    shard = IndexedShard(tmp_path / "m")
    assert shard.sample(0)[0].tolist() == [10, 11, 12, 20] and shard.sample(0)[2].tolist() == [3, 1]
    assert shard.sample(1)[0].tolist() == [30, 31]
