"""Hugging Face sources: save_to_disk folders load offline; hub names fail fast offline with a way out."""

from __future__ import annotations

import socket

import pytest

datasets = pytest.importorskip("datasets")

from moeforge.data.hf_source import check_hf_source, hf_sha256, hf_uri, iter_hf_items  # noqa: E402
from moeforge.data.recipe import HfSource  # noqa: E402
from moeforge.data.sources import SourceError  # noqa: E402

ROWS = {"question": ["one?", "two?", "three?"], "answer": ["1", "2", "3"]}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ds"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(path))
    return path


@pytest.fixture
def saved_dict(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(ROWS),
            "test": datasets.Dataset.from_dict({"question": ["four?"], "answer": ["4"]}),
        }
    ).save_to_disk(str(path))
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection; restore datasets' offline flag afterwards."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also restores the variable _load sets
    return attempts


def test_a_saved_dataset_yields_rows_with_their_offsets(saved):
    src = HfSource(path=str(saved))
    items = list(iter_hf_items(src))
    assert [i.data for i in items] == [
        {"question": q, "answer": a} for q, a in zip(*ROWS.values(), strict=True)
    ]
    assert [i.offset for i in items] == [0, 1, 2]
    assert {i.uri for i in items} == {f"hf-disk://{saved}"} and all(i.line is None for i in items)


def test_hf_sha256_is_stable_and_follows_the_data(tmp_path, saved):
    src = HfSource(path=str(saved))
    assert hf_sha256(src) == hf_sha256(src) and len(hf_sha256(src)) == 64
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"question": ["x?"], "answer": ["y"]}).save_to_disk(str(other))
    assert hf_sha256(HfSource(path=str(other))) != hf_sha256(src)


def test_a_dataset_dict_with_several_splits_needs_split(saved_dict):
    with pytest.raises(SourceError, match=r"holds splits \['test', 'train'\]; set split"):
        list(iter_hf_items(HfSource(path=str(saved_dict))))
    items = list(iter_hf_items(HfSource(path=str(saved_dict), split="test")))
    assert [i.data["question"] for i in items] == ["four?"]
    assert items[0].uri == f"hf-disk://{saved_dict}#test"
    with pytest.raises(SourceError, match=r"no split 'valid' \(has \['test', 'train'\]\)"):
        check_hf_source(HfSource(path=str(saved_dict), split="valid"))


def test_a_dataset_dict_with_one_split_needs_no_split(tmp_path):
    path = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(path))
    assert len(list(iter_hf_items(HfSource(path=str(path))))) == 3


def test_a_missing_directory_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        check_hf_source(HfSource(path=str(tmp_path / "absent")))


def test_a_directory_that_is_not_a_saved_dataset_is_a_source_error(tmp_path):
    (tmp_path / "junk.txt").write_text("x", encoding="utf-8")
    with pytest.raises(SourceError, match="not a saved dataset"):
        check_hf_source(HfSource(path=str(tmp_path)))


def test_a_hub_name_offline_fails_fast_saying_how_to_use_local_files(no_network):
    src = HfSource(name="moeforge-tests/no-such-dataset", config="main", split="train")
    with pytest.raises(SourceError) as exc:
        check_hf_source(src)
    msg = str(exc.value)
    assert "moeforge-tests/no-such-dataset" in msg and "offline" in msg
    assert "path:" in msg and "save_to_disk" in msg
    assert no_network == []


def test_an_unreachable_hub_counts_as_offline(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(SourceError, match="not reachable"):
        check_hf_source(HfSource(name="moeforge-tests/no-such-dataset", split="train"))
    assert len(no_network) == 1  # the one reachability probe, refused


def test_a_hub_name_without_split_is_a_source_error(no_network):
    with pytest.raises(SourceError, match="set split"):
        check_hf_source(HfSource(name="openai/gsm8k", config="main"))
    assert no_network == []


def test_uris_name_the_dataset_and_split():
    assert hf_uri(HfSource(name="openai/gsm8k", config="main", split="test")) == "hf://openai/gsm8k/main/test"
    assert hf_uri(HfSource(name="org/ds", split="train")) == "hf://org/ds/train"
    assert hf_uri(HfSource(path="/d")) == "hf-disk:///d"


def test_a_split_asked_of_a_single_saved_dataset_is_an_error(saved):
    with pytest.raises(SourceError, match="split"):
        list(iter_hf_items(HfSource(path=str(saved), split="test")))
