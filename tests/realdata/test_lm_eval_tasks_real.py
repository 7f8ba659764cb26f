"""The offline lm-eval task suite (configs/eval) on the real data in ``$MOEFORGE_REAL_DATA``: every task
loads through lm-eval's TaskManager with the documented document counts, the multiple-choice rule holds on
the whole GSM8K test split, and every HumanEval canonical solution passes in the sandbox."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from lm_eval.tasks import TaskManager

pytestmark = pytest.mark.realdata

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


@pytest.fixture(scope="module")
def tasks(real_data: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(key, "1")
        mp.delenv("MOEFORGE_EVAL_DATA", raising=False)
        mp.setenv("MOEFORGE_REAL_DATA", str(real_data))
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        return manager.load(["moeforge_offline"])["tasks"]


def test_document_counts(tasks: dict[str, Any]) -> None:
    counts = {name: len(task.eval_docs) for name, task in tasks.items()}
    assert counts == {
        "moeforge_gsm8k": 1319,
        "moeforge_gsm8k_mc": 1319,
        "moeforge_humaneval": 164,
        "moeforge_ppl_en": 100,
        "moeforge_ppl_ru": 100,
        "moeforge_identity": 10,
    }
    assert len(tasks["moeforge_gsm8k"].fewshot_docs()) == 7473  # the few-shot pool is GSM8K train
    authors = Counter(d["source"].split("/")[1] for d in tasks["moeforge_ppl_ru"].eval_docs)
    assert authors == {"Chekhov": 77, "Lermontov": 3, "Pushkin": 10, "Turgenev": 10}
    for name in ("moeforge_ppl_en", "moeforge_ppl_ru"):
        lengths = [len(d["text"]) for d in tasks[name].eval_docs]
        assert min(lengths) >= 300 and max(lengths) <= 2000 and sum(lengths) / len(lengths) > 1000
    for name, task in tasks.items():
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=2)
        assert task.instances, name


def test_gsm8k_mc_rule_on_the_test_split(tasks: dict[str, Any]) -> None:
    labels = Counter()
    for doc in tasks["moeforge_gsm8k_mc"].eval_docs:
        choices, label, gold = doc["choices"], doc["label"], doc["target"]
        assert choices[label] == gold and choices.count(gold) == 1 and len(set(choices)) == 4
        assert all(not c.startswith("-") for c in choices) or gold.startswith("-")
        labels[label] += 1
    assert labels == {0: 342, 1: 308, 2: 319, 3: 350}  # the hash spreads the answer over A-D


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_in_the_sandbox(tasks: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    task = tasks["moeforge_humaneval"]
    docs = list(task.eval_docs)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
        scores = list(pool.map(lambda d: task.process_results(d, [d["canonical_solution"]])["pass@1"], docs))
    assert [d["task_id"] for d, s in zip(docs, scores, strict=True) if s != 1.0] == []
