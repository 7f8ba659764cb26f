"""moeforge_heldout: a data run's held-out records as lm-eval documents, read the way the packer reads them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from moeforge.data.store import ShardWriter
from moeforge.harness.run import default_tasks_dir


def _utils() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "moeforge_eval_task_utils", default_tasks_dir() / "utils.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root: Path) -> Path:
    for split, texts in {"test": ["plain text one", None, "third"], "train": ["not held out"]}.items():
        w = ShardWriter(root / "records" / split, shard_records=2)
        for i, text in enumerate(texts):
            rec = {"id": f"r{i}", "text": text, "messages": None, "meta": {"domain": "prose"}}
            if text is None:
                rec["messages"] = [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
                rec["meta"] = {"domain": "chat"}
            w.write_json(json.dumps(rec))
        w.close()
    return root


def test_heldout_reads_every_test_record_as_one_document(tmp_path: Path) -> None:
    ds = _utils().load_heldout(run=str(_run(tmp_path / "run")))["test"]
    assert ds[0]["text"] == "plain text one" and len(ds) == 3  # two shards, in order
    chat = ds[1]
    assert chat["domain"] == "chat" and chat["text"].startswith("<|im_start|>user\nhi<|im_end|>")
    assert "not held out" not in {r["text"] for r in ds}


def test_heldout_takes_another_split_and_the_run_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    run = _run(tmp_path / "run")
    monkeypatch.setenv("MOEFORGE_EVAL_RUN", str(run))
    assert [r["text"] for r in _utils().load_heldout(split="train")["test"]] == ["not held out"]


def test_heldout_without_a_run_or_records_says_what_to_pass(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MOEFORGE_EVAL_RUN", raising=False)
    utils = _utils()
    with pytest.raises(ValueError, match=r"which data run\?.*MOEFORGE_EVAL_RUN"):
        utils.load_heldout()
    with pytest.raises(ValueError, match=r"no records/test/\*\.jsonl\.zst"):
        utils.load_heldout(run=str(tmp_path))
