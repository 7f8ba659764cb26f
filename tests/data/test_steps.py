"""The map stage as a list of steps: the default list writes what the hand-written stage wrote, each
step counts what it drops by reason, a recipe's ``steps:`` adds, removes and orders steps, and a list
that cannot run is a clear error before anything is written."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeforge.config import ConfigError, validate_config
from moeforge.data.contract import Record
from moeforge.data.pipeline import run_pipeline
from moeforge.data.plan import Task
from moeforge.data.recipe import DEFAULT_STEPS, Recipe, recipe_hash
from moeforge.data.sources import Quarantined
from moeforge.data.steps import STEPS, RecordStep, StepError, TaskContext, check_steps, run_steps
from moeforge.data.store import iter_lines, read_records

# ---- a small corpus on which every step but identity drops or quarantines something ----

NOUNS = ["miller", "river", "stone", "garden", "teacher", "village", "market", "lantern", "harbor", "orchard",
         "sailor", "baker", "meadow", "kettle", "window", "letter", "painter", "forest", "candle", "wagon"]  # fmt: skip
ADJS = ["a quiet", "every", "the green", "one old", "that small", "the bright", "a heavy", "the last"]
VERBS = ["watched", "carried", "painted", "counted", "followed", "visited", "mended", "described"]
PLACES = ["near the bridge", "after the rain", "before the market opened", "in the quiet morning", "by the old wall",
          "during the long winter", "while the town slept", "under the tall trees", "along the narrow road"]  # fmt: skip
BENCH = {
    "question": "A lighthouse keeper climbs one hundred and twelve steps every single evening to light the great "
    "lamp at the top of the tower. How many steps in a week?",
    "answer": "112 * 7 = <<112*7=784>>784\n#### 784",
}
GERMAN = (
    "Der Hund lief schnell über die grüne Wiese und bellte laut, weil er den roten Ball im hohen Gras sah. "
)
PII = "Write to anna{i}@example.com or call +1 415 555 01{i:02d}. "


def _prose(i: int) -> str:
    rng = random.Random(i)
    nouns, adjs, places = rng.sample(NOUNS, 14), rng.sample(ADJS, 7), rng.sample(PLACES, 7)
    return " ".join(
        f"The {nouns[2 * k]} {rng.choice(VERBS)} {adjs[k]} {nouns[2 * k + 1]} {places[k]}." for k in range(7)
    )


def _question(i: int) -> dict[str, str]:
    a, b = 3 + i, 5 + 2 * i
    return {
        "question": f"A {NOUNS[i % 20]} has {a} baskets and buys {b} more baskets at the market. "
        "How many baskets are there now?",
        "answer": f"There are {a} + {b} = <<{a}+{b}={a + b}>>{a + b} baskets.\n#### {a + b}",
    }


def write_corpus(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    qa = [json.dumps(_question(i)) for i in range(40)]
    qa[7] = "{this is not json"  # read: quarantined
    qa[19] = json.dumps({"question": "Where is the answer field?"})  # format: quarantined
    qa[23] = json.dumps(
        {"question": "Before bed: " + BENCH["question"], "answer": BENCH["answer"]}
    )  # decontam
    qa += [json.dumps(_question(i)) for i in (2, 3, 5)]  # exact duplicates
    (root / "qa.jsonl").write_text("\n".join(qa) + "\n", encoding="utf-8")
    docs = [json.dumps({"text": _prose(i)}) for i in range(30)]
    docs[4] = json.dumps({"text": "Too short to keep."})  # filters: word count
    docs[9] = json.dumps({"text": GERMAN * 4})  # langid: not kept
    docs[13] = json.dumps({"text": _prose(13) + " " + "".join(PII.format(i=i) for i in range(3))})  # review
    docs[17] = '{"text": broken'  # read: quarantined
    docs[21] = json.dumps({"text": (_prose(1) + "\n") * 3})  # filters: repetition
    docs += [json.dumps({"text": _prose(6)})]  # an exact duplicate
    (root / "docs.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (root / "bench.jsonl").write_text(json.dumps(BENCH) + "\n", encoding="utf-8")


def recipe_data(**over: object) -> dict:
    data: dict = {
        "name": "pinned",
        "sources": [  # relative paths: the outputs do not depend on the test's temporary directory
            {"name": "qa", "path": "in/qa.jsonl", "kind": "qa", "family": "baskets", "domain": "math"},
            {"name": "docs", "path": "in/docs.jsonl", "kind": "text", "family": "mill", "domain": "prose"},
        ],
        "langid": {"keep": ["en"], "candidates": ["en", "de", "fr"]},
        "filters": {"min_words": 20},
        "decontamination": {
            "enabled": True,
            "benchmarks": [{"name": "mini", "path": "in/bench.jsonl", "format": "gsm8k"}],
        },
        "identity": {
            "system_prompts": {"*": "<|oracle_sys|>You are Oracle."},
            "intros": {"*": "<|oracle_intro|>Oracle here. "},
            "intro_fraction": 0.5,
        },
        "split": {"min_eval_records": 1},
        "gates": {"train_ratio": [0.0, 1.0], "eval_ratio": [0.0, 1.0]},
    }
    data.update(over)
    return data


def _run(root: Path, monkeypatch: pytest.MonkeyPatch, **over: object) -> Path:
    write_corpus(root / "in")
    monkeypatch.chdir(root)
    run_pipeline(Recipe.model_validate(recipe_data(**over)), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        return _run(tmp_path_factory.mktemp("pinned"), mp)


def _stages(run: Path) -> list[list]:
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    return [[s["stage"], s["in"], s["out"], s["dropped"], s["quarantined"]] for s in manifest["stages"]]


def _digest(run: Path, pattern: str) -> str:
    """sha256 of the records' JSON (zstd's bytes and the recipe hash left out)."""
    h = hashlib.sha256()
    for path in sorted(run.glob(pattern)):
        for _, line in iter_lines(path):
            rec = json.loads(line)
            rec["meta"]["provenance"].pop("recipe_hash")
            h.update(json.dumps(rec, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def _snapshot(run: Path) -> dict[str, bytes]:
    files = ["manifest.json", "quarantine/quarantine.jsonl"]
    files += [p.relative_to(run).as_posix() for p in [*run.glob("records/*/*"), *run.glob("review/*")]]
    return {f: (run / f).read_bytes() for f in sorted(files)}


# ---- the default list against the hand-written stage it replaced ----

# Recorded with the hand-written stage (before steps existed, at commit 9398484). A deliberate change to
# what a step does changes them: update them and say why.
PINNED_STAGES = [
    ["read", 74, 72, {}, 2],
    ["format", 72, 71, {}, 1],
    ["langid", 71, 70, {"langid:not_kept": 1}, 0],
    ["filters", 70, 68, {"gopher_quality:word_count": 1, "gopher_repetition:dup_lines": 1}, 0],
    ["decontam", 68, 67, {"decontam:mini": 1}, 0],
    ["pii", 67, 66, {"pii:requires_review": 1}, 0],
    ["identity", 66, 66, {}, 0],
    ["dedup", 66, 62, {"dedup:exact": 4}, 0],
    ["split", 62, 62, {}, 0],
]
PINNED_DIGESTS = {
    "records/train/*.jsonl.zst": "4c4ca6f15c336fe282aa4926ac72b368dd58371b9cfe821bc09eea4b856a5513",
    "records/valid/*.jsonl.zst": "409d0f50540c8e08493a4b47fb30373357d501be4f0360bd4dfac38088f574ba",
    "records/test/*.jsonl.zst": "42f14c213cddcb514678eed171ce3be78b1556864222d2b8de4050b2ee6af8a4",
    "review/*.jsonl.zst": "c08b22aea53bf16946e32cfdc665845c15be3e82411e4d61d434f4ee666978e4",
}
PINNED_QUARANTINE = "70bbd43520fd18456450441aa0e399d28c1fb54e52c724f82888c505749cedfa"


def test_default_steps_write_what_the_hand_written_stage_wrote(pinned: Path) -> None:
    assert _stages(pinned) == PINNED_STAGES
    assert {p: _digest(pinned, p) for p in PINNED_DIGESTS} == PINNED_DIGESTS
    quarantine = (pinned / "quarantine" / "quarantine.jsonl").read_bytes()
    assert hashlib.sha256(quarantine).hexdigest() == PINNED_QUARANTINE
    assert [json.loads(line)["stage"] for line in quarantine.splitlines()] == ["read", "format", "read"]


def test_listing_the_default_steps_changes_no_byte(
    pinned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = _run(tmp_path, monkeypatch, steps=list(DEFAULT_STEPS))
    assert _snapshot(listed) == _snapshot(pinned)


def test_each_task_times_every_step_including_the_sink(pinned: Path) -> None:
    stats = json.loads(next((pinned / "work" / "map").glob("*/stats.json")).read_text(encoding="utf-8"))
    assert sorted(stats["seconds"]) == sorted(DEFAULT_STEPS)
    assert [s["stage"] for s in stats["stages"]] == list(DEFAULT_STEPS[:-1])  # the sink drops nothing


# ---- recipes that list their own steps ----


def test_a_step_left_out_does_not_run_and_has_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = ["read", "format", "filters", "decontam", "pii", "write"]
    data = {k: v for k, v in recipe_data().items() if k not in ("langid", "identity")}
    write_corpus(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(Recipe.model_validate({**data, "steps": steps}), tmp_path / "run")
    assert [s.stage for s in result.stages] == [*steps[:-1], "dedup", "split"]
    records = [r for p in (tmp_path / "run" / "records").glob("*/*.jsonl.zst") for r in read_records(p)]
    assert records and all(r.meta.lang is None for r in records)
    assert not any(m.role == "system" for r in records for m in r.messages or [])


class NoSevens(RecordStep):
    """A step added by a test: drops records whose text has a 7, by where the 7 is."""

    name = "no_sevens"

    def apply(self, rec: Record) -> Record | None:
        if rec.messages is not None and "7" in rec.messages[0].content:
            return self.drop("no_sevens:question")
        if "7" in "".join(rec.contents()):
            return self.drop("no_sevens:text")
        return rec


def test_a_new_step_is_one_class_and_one_recipe_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STEPS, NoSevens.name, NoSevens)
    steps = [*DEFAULT_STEPS[:4], "no_sevens", *DEFAULT_STEPS[4:]]
    run = _run(tmp_path, monkeypatch, steps=steps)
    rows = {row[0]: row for row in _stages(run)}
    _, n_in, n_out, dropped, _ = rows["no_sevens"]
    assert n_in == rows["filters"][2] and n_out == rows["decontam"][1]
    assert set(dropped) == {"no_sevens:question", "no_sevens:text"} and n_in == n_out + sum(dropped.values())
    records = [r for p in (run / "records").glob("*/*.jsonl.zst") for r in read_records(p)]
    assert records and not any("7" in "".join(r.contents()) for r in records)


# ---- the step interface ----


class OddOut(RecordStep):
    name = "odd_out"

    def apply(self, n: int) -> int | None:
        if n < 0:
            return self.quarantine(Quarantined(uri="test://", error=f"negative: {n}", raw=str(n)))
        if n % 2:
            return self.drop("odd_out:big" if n > 10 else "odd_out:small")
        return n


class Forgetful(RecordStep):
    name = "forgetful"

    def apply(self, n: int) -> int | None:
        return None if n == 3 else n


def _context(tmp_path: Path, quarantine: io.StringIO) -> TaskContext:
    recipe = Recipe.model_validate(recipe_data())
    return TaskContext(Task("s00-t00000", 0, ()), recipe, "0" * 64, tmp_path, quarantine)


def test_a_record_step_counts_in_out_each_drop_reason_and_quarantine(tmp_path: Path) -> None:
    quarantine = io.StringIO()
    step = OddOut(_context(tmp_path, quarantine))
    kept = list(step.run(iter([-1, 1, 2, 3, 4, 11, 12, 13, -5])))
    assert kept == [2, 4, 12]
    assert step.stats.to_json() == {
        "stage": "odd_out",
        "in": 9,
        "out": 3,
        "dropped": {"odd_out:big": 2, "odd_out:small": 2},
        "quarantined": 2,
    }
    assert step.stats.balanced and step.stats.seconds > 0
    lines = [json.loads(line) for line in quarantine.getvalue().splitlines()]
    assert [(q["stage"], q["source"], q["error"]) for q in lines] == [
        ("odd_out", "qa", "negative: -1"),
        ("odd_out", "qa", "negative: -5"),
    ]


def test_a_step_that_loses_an_item_without_a_reason_fails_the_task(tmp_path: Path) -> None:
    step = Forgetful(_context(tmp_path, io.StringIO()))
    with pytest.raises(RuntimeError, match=r"'forgetful' lost items.*drop\(\) or quarantine\(\)"):
        list(step.run(iter(range(5))))


def test_run_steps_streams_each_item_through_the_whole_chain_in_order(tmp_path: Path) -> None:
    seen: list[str] = []

    class Source(RecordStep):
        name = "source"

        def run(self, items: Iterator[int]) -> Iterator[int]:
            for n in range(4):
                seen.append(f"read {n}")
                yield n

    class Sink(RecordStep):
        name = "sink"

        def apply(self, n: int) -> int:
            seen.append(f"write {n}")
            return n

    ctx = _context(tmp_path, io.StringIO())
    run_steps([Source(ctx), OddOut(ctx), Sink(ctx)])
    assert seen == ["read 0", "write 0", "read 1", "read 2", "write 2", "read 3"]


# ---- lists that cannot run ----


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (["read", "format", "dedupe", "write"], "unknown step 'dedupe'; the steps are read, format, langid"),
        (["read", "format", "pii", "pii", "write"], "'pii' is listed twice"),
        (
            ["read", "format", "write", "identity"],
            "'write' ends a task and must be last, but 'identity' follows",
        ),
        (
            ["read", "langid", "format", "write"],
            "'langid' takes records but follows 'read', which yields raw items; put format between them",
        ),
        (["format", "read", "write"], "the first step must be a source (read), not 'format'"),
        (["read", "format", "langid"], "the last step must end the task (write), not 'langid'"),
        (
            ["read", "format", "langid", "write"],
            "the decontamination section is configured but its step 'decontam' is not in steps",
        ),
    ],
)
def test_steps_that_cannot_run_are_a_clear_error(steps: list[str], message: str) -> None:
    recipe = Recipe.model_validate(recipe_data(steps=steps, identity=None, filters={}, pii={}))
    with pytest.raises(StepError, match="^recipe steps: " + re.escape(message)):
        check_steps(recipe)


def test_a_bad_step_list_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    recipe = Recipe.model_validate(recipe_data(steps=["read", "format", "dedupe", "write"]))
    with pytest.raises(StepError, match="unknown step 'dedupe'"):
        run_pipeline(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_step_list_is_a_usage_error_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe_data(steps=["read", "format", "dedupe", "write"])), encoding="utf-8")
    cmd = [sys.executable, "-m", "moeforge", "data", "run", str(path), "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown step 'dedupe'" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_an_empty_or_misspelt_steps_setting_is_a_recipe_error() -> None:
    with pytest.raises(ConfigError, match="steps"):
        validate_config(Recipe, recipe_data(steps=[]), source="inline")
    with pytest.raises(ConfigError, match="stpes"):
        validate_config(Recipe, recipe_data(stpes=["read"]), source="inline")


def test_the_default_steps_stay_out_of_the_resolved_recipe_and_its_hash() -> None:
    plain = Recipe.model_validate(recipe_data())
    listed = Recipe.model_validate(recipe_data(steps=list(DEFAULT_STEPS)))
    assert "steps" not in plain.resolved() and recipe_hash(plain) == recipe_hash(listed)
    custom = Recipe.model_validate(recipe_data(steps=["read", "format", "decontam", "write"], langid={}))
    assert custom.resolved()["steps"] == ["read", "format", "decontam", "write"]
    assert recipe_hash(custom) != recipe_hash(plain)
    assert set(DEFAULT_STEPS) <= set(STEPS)
