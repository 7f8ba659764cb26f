"""The offline lm-eval task suite (configs/eval) through lm-eval 0.4.13 itself: its TaskManager loads the
YAMLs from a small synthetic data root written here (the layout of ../shared/data), builds the requests,
and scores fixed generations with the tasks' own metric functions, with the Hugging Face hub switched off.
"""

from __future__ import annotations

import gzip
import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
TASKS = (
    "moeforge_gsm8k",
    "moeforge_gsm8k_mc",
    "moeforge_humaneval",
    "moeforge_ppl_en",
    "moeforge_ppl_ru",
    "moeforge_identity",
)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# ---- the synthetic data root --------------------------------------------------------------------------

GSM8K_TEST = [
    (
        "A shop has 1,000 pens and gets 80 more. How many pens?",
        "1,000 + 80 = <<1000+80=1080>>1,080\n#### 1,080",
    ),
    ("It is 2 degrees, then 5 colder. What is the temperature?", "2 - 5 = <<2-5=-3>>-3\n#### -3"),
    ("Ann has 4 apples and eats 4. How many are left?", "4 - 4 = <<4-4=0>>0\n#### 0"),
    ("Bo has 3 cats and gets 4 more. How many cats?", "3 + 4 = <<3+4=7>>7\n#### 7"),
]

HUMANEVAL = [
    {
        "task_id": "Synth/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n',
        "canonical_solution": "    return a + b\n",
        "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Synth/1",
        "prompt": 'def is_palindrome(s: str) -> bool:\n    """True when s reads the same backwards."""\n',
        "canonical_solution": "    return s == s[::-1]\n",
        "test": "\n\ndef check(candidate):\n    assert candidate('abba')\n    assert not candidate('abc')\n",
        "entry_point": "is_palindrome",
    },
    {
        "task_id": "Synth/2",
        "prompt": 'def fib(n: int) -> int:\n    """The n-th Fibonacci number, fib(0) = 0."""\n',
        "canonical_solution": "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "test": "\n\ndef check(candidate):\n    assert candidate(10) == 55\n    assert candidate(1) == 1\n",
        "entry_point": "fib",
    },
]

LINE = "Now is the winter of our discontent made glorious summer by this sun of York. "


def shakespeare_paragraphs() -> list[str]:
    paragraphs = [f"SPEAKER {i}:\n" + LINE * (1 + i % 4) + f"Thus ends turn {i}." for i in range(60)]
    paragraphs[30] = "LONG:\n" + LINE * 35  # ~2,700 characters: longer than a document may be
    return paragraphs


def write_data_root(root: Path) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    train = [
        {
            "question": f"TRAIN-{i}: Tom has {i} apples and buys {i + 2} more. How many apples?",
            "answer": f"Tom has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}",
        }
        for i in range(8)
    ]
    test = [{"question": f"TEST-{i}: {q}", "answer": a} for i, (q, a) in enumerate(GSM8K_TEST)]
    for name, rows in (("train", train), ("test", test)):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (root / "gsm8k" / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (root / "humaneval").mkdir()
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in HUMANEVAL)
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text("\n\n".join(shakespeare_paragraphs()) + "\n", "utf-8")
    works = {
        "Chekhov/Анюта.txt": 12,
        "Chekhov/Агафья.txt": 30,
        "Pushkin/Дубровский.txt": 20,
    }
    for rel, n in works.items():
        path = root / "ruslit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"Абзац {i} из {path.stem}: " + "Мороз и солнце, день чудесный. " * (2 + i % 3) for i in range(n)
        ]
        path.write_text("Автор\nНАЗВАНИЕ\n" + "\n".join(lines) + "\n", encoding="utf-8")
        (path.parent / "info.csv").write_text("name,year\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data_root(tmp_path_factory.mktemp("evaldata") / "data")


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, data_root: Path) -> Path:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MOEFORGE_EVAL_DATA", str(data_root))
    monkeypatch.delenv("MOEFORGE_REAL_DATA", raising=False)
    for var in ("MOEFORGE_IDENTITY_NAME", "MOEFORGE_IDENTITY_OTHERS", "MOEFORGE_SANDBOX_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    return data_root


def load(*names: str, **kwargs: Any) -> dict[str, Any]:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, **kwargs).load(list(names))


@pytest.fixture
def tasks(offline_env: Path) -> dict[str, Any]:
    return load("moeforge_offline")["tasks"]


def requests(task: Any, limit: int | None = None, **kwargs: Any) -> list[Any]:
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=limit, **kwargs)
    return task.instances


def module_of(task: Any) -> dict[str, Any]:
    """The globals of the utils/sandbox module lm-eval loaded for this task (its process_results's)."""
    fn = task.config.process_results or task.config.custom_dataset
    return fn.__globals__


# ---- loading and requests -----------------------------------------------------------------------------


def test_group_lists_every_task(offline_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading the offline tasks tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    loaded = load("moeforge_offline")
    assert loaded["group_map"] == {"moeforge_offline": list(TASKS)}
    assert sorted(loaded["tasks"]) == sorted(TASKS)


@pytest.mark.parametrize(
    ("name", "request_type", "docs", "per_doc"),
    [
        ("moeforge_gsm8k", "generate_until", 4, 1),
        ("moeforge_gsm8k_mc", "loglikelihood", 4, 4),
        ("moeforge_humaneval", "generate_until", 3, 1),
        ("moeforge_ppl_en", "loglikelihood_rolling", None, 1),
        ("moeforge_ppl_ru", "loglikelihood_rolling", 3, 1),
        ("moeforge_identity", "generate_until", 10, 1),
    ],
)
def test_requests(
    tasks: dict[str, Any], name: str, request_type: str, docs: int | None, per_doc: int
) -> None:
    task = tasks[name]
    n_docs = len(task.eval_docs)
    if docs is not None:
        assert n_docs == docs
    instances = requests(task)
    assert len(instances) == n_docs * per_doc
    assert {i.request_type for i in instances} == {request_type}
    if request_type == "generate_until":
        kwargs = instances[0].arguments[1]
        assert kwargs["do_sample"] is False and "<|im_end|>" in kwargs["until"]


def test_gsm8k_prompt_fewshot_from_train(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_gsm8k"]
    kwargs = requests(task)[0].arguments[1]
    assert kwargs["max_gen_toks"] == 256
    assert set(kwargs["until"]) >= {"Question:", "</s>", "<|im_end|>", "\n\n"}
    contexts = [i.arguments[0] for i in requests(task)]
    for inst, ctx in zip(task.instances, contexts, strict=True):
        assert ctx.count("TRAIN-") == 5  # 5 shots, all from train
        assert ctx.count("TEST-") == 1 and ctx.endswith(f"Question: {inst.doc['question']}\nAnswer:")
        assert "<<" not in ctx and "#### " in ctx  # shots show worked answers without calculator notes
    assert [i.arguments[0] for i in requests(task)] == contexts  # seeded: the same shots again


def test_gsm8k_exact_match(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_gsm8k"]
    docs = list(task.eval_docs)
    assert [d["target"] for d in docs] == ["1080", "-3", "0", "7"]

    def score(doc: dict[str, Any], generation: str) -> float:
        return task.process_results(doc, [generation])["exact_match"]

    assert score(docs[0], " 1000 + 80 = 1080 pens.\n#### 1,080") == 1.0
    assert score(docs[0], " The shop has $1,080.") == 1.0
    assert score(docs[0], " It has 1080.00 pens") == 1.0
    assert score(docs[0], " 1080 pens, and 7 boxes") == 0.0  # the last number counts
    assert score(docs[0], " I do not know") == 0.0
    assert score(docs[1], " 2 - 5 = -3 degrees") == 1.0
    assert score(docs[1], " 3") == 0.0
    assert score(docs[2], " none, so 0.") == 1.0
    assert score(docs[3], " 8") == 0.0


def rule_choices(question: str, gold: str) -> tuple[list[str], int]:
    """The distractor rule as the YAML states it, written again independently of utils.py."""
    import hashlib

    a = int(gold)
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    cands = [a + 1, a - 1, 2 * a, math.floor(a / 2), a + 10, a - 10]
    cands = cands[h % 6 :] + cands[: h % 6] + [a + k for k in range(2, 100)]
    picked: list[int] = []
    for c in cands:
        if len(picked) < 3 and c != a and c not in picked and not (a >= 0 and c < 0):
            picked.append(c)
    label = (h // 6) % 4
    return [str(x) for x in [*picked[:label], a, *picked[label:]]], label


def test_gsm8k_mc_distractors_follow_the_rule(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_gsm8k_mc"]
    for doc in task.eval_docs:
        choices, label = doc["choices"], doc["label"]
        assert (choices, label) == rule_choices(doc["question"], doc["target"])
        assert choices[label] == doc["target"] and choices.count(doc["target"]) == 1
        assert len(set(choices)) == 4
        if int(doc["target"]) >= 0:
            assert all(int(c) >= 0 for c in choices)
    distractors = module_of(task)["gsm8k_distractors"]
    for q, gold in [
        ("q0", "0"),
        ("q1", "1"),
        ("q2", "-3"),
        ("q3", "12.5"),
        *((f"x{i}", str(i)) for i in range(300)),
    ]:
        choices, label = distractors(q, gold)
        assert choices[label] == gold and choices.count(gold) == 1 and len(set(choices)) == 4
        if not gold.startswith("-"):
            assert all(not c.startswith("-") for c in choices)
    assert distractors("q3", "12.5")[0].count("6.25") == 1  # a/2 unrounded for a non-whole answer
    labels = [distractors(f"x{i}", "5")[1] for i in range(400)]
    assert all(labels.count(k) > 60 for k in range(4))  # the right answer is spread over A-D


def test_gsm8k_mc_requests_and_accuracy(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_gsm8k_mc"]
    instances = requests(task, limit=1)
    doc = instances[0].doc
    assert [i.arguments[1] for i in instances] == [f" {c}" for c in doc["choices"]]
    assert instances[0].arguments[0] == f"Question: {doc['question']}\nAnswer:"
    right = [(0.0 if k == doc["label"] else -9.0, False) for k in range(4)]
    wrong = [(0.0 if k == (doc["label"] + 1) % 4 else -9.0, False) for k in range(4)]
    assert task.process_results(doc, right) == {"acc": 1.0, "acc_norm": 1.0}
    assert task.process_results(doc, wrong) == {"acc": 0.0, "acc_norm": 0.0}


# ---- HumanEval in the sandbox -------------------------------------------------------------------------


@pytest.fixture
def humaneval(tasks: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MOEFORGE_SANDBOX_TIMEOUT", "1.5")
    return tasks["moeforge_humaneval"]


def pass_at_1(task: Any, doc: dict[str, Any], completion: str) -> float:
    return task.process_results(doc, [completion])["pass@1"]


def test_humaneval_prompt_is_the_problem(humaneval: Any) -> None:
    for inst, problem in zip(requests(humaneval), HUMANEVAL, strict=True):
        assert inst.arguments[0] == problem["prompt"]
    assert humaneval.UNSAFE_CODE  # lm-eval asks for --confirm_run_unsafe_code


def test_humaneval_canonical_passes_wrong_fails(humaneval: Any) -> None:
    docs = list(humaneval.eval_docs)
    assert [pass_at_1(humaneval, d, d["canonical_solution"]) for d in docs] == [1.0, 1.0, 1.0]
    assert pass_at_1(humaneval, docs[0], "    return a - b\n") == 0.0
    assert pass_at_1(humaneval, docs[1], "    return (\n") == 0.0  # a syntax error
    assert humaneval.process_results(docs[0], ["    return a + b\n", "    return a * b\n"]) == {"pass@1": 0.5}


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param("    while True:\n        pass\n", id="infinite-loop"),
        pytest.param(
            "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return a + b\n",
            id="socket",
        ),
        pytest.param("    import socket\n    socket.socket()\n    return a + b\n", id="socket-create"),
        pytest.param(
            "    import subprocess\n    subprocess.run(['true'])\n    return a + b\n", id="subprocess"
        ),
        pytest.param("    import sys\n    sys.exit(0)\n", id="exit-0-before-checks"),
        pytest.param("    import os\n    os._exit(0)\n", id="os-exit-0"),
        pytest.param("    x = bytearray(8 * 1024**3)\n    return a + b\n", id="memory"),
    ],
)
def test_humaneval_misbehaving_code_scores_zero(humaneval: Any, completion: str) -> None:
    doc = next(iter(humaneval.eval_docs))
    assert pass_at_1(humaneval, doc, completion) == 0.0


def test_sandbox_limits(humaneval: Any) -> None:
    sandbox = module_of(humaneval)
    run = sandbox["run_program"]
    looped = run("while True:\n    pass\n", timeout=1.0)
    assert looped.timed_out and not looped.passed
    blocked = run("import socket\nsocket.socket()\n", timeout=5.0)
    assert not blocked.passed and "PermissionError" in blocked.stderr
    where = run(
        "import os, resource\nprint(os.getcwd(), resource.getrlimit(resource.RLIMIT_CORE), sorted(os.environ))\n"
    )
    assert where.passed and "moeforge-sandbox-" in where.stdout and "(0, 0)" in where.stdout
    assert "MOEFORGE_EVAL_DATA" not in where.stdout  # an empty environment, not the caller's


def test_network_namespace_blocks_connections_without_the_guard(humaneval: Any) -> None:
    """Where the kernel allows a user + network namespace, even code that gets past the Python guard
    cannot reach a server listening on the host's loopback."""
    run = module_of(humaneval)["run_program"]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        )
        result = run(code, timeout=5.0, guard=False)
    if not result.network_namespace:
        pytest.skip("unprivileged user/network namespaces are not available here; the guard alone blocks")
    assert not result.passed and "connected" not in result.stdout


# ---- perplexity documents -----------------------------------------------------------------------------


def test_ppl_documents_are_deterministic_tails(offline_env: Path) -> None:
    first = load("moeforge_ppl_en", "moeforge_ppl_ru")["tasks"]
    again = load("moeforge_ppl_en", "moeforge_ppl_ru")["tasks"]
    for name in ("moeforge_ppl_en", "moeforge_ppl_ru"):
        docs = [dict(d) for d in first[name].eval_docs]
        assert docs == [dict(d) for d in again[name].eval_docs]
        assert all(300 <= len(d["text"]) <= 2000 for d in docs)
    en = [d["text"] for d in first["moeforge_ppl_en"].eval_docs]
    paragraphs = shakespeare_paragraphs()
    assert en[-1].endswith(paragraphs[-1])  # the tail of input.txt, in reading order
    # documents close at >= 1,000 characters; the one exception is the fragment cut off by the long turn
    assert [t.split(":")[0] for t in en if len(t) < 1000] == ["SPEAKER 31"]
    positions = [
        paragraphs.index(t.split("\n\n")[0].strip()) if t.startswith("SPEAKER") else None for t in en
    ]
    known = [p for p in positions if p is not None]
    assert known == sorted(known)
    assert any(t.startswith("LONG:") and len(t) <= 2000 for t in en)  # the long turn, cut to size
    ru = list(first["moeforge_ppl_ru"].eval_docs)
    assert [d["source"] for d in ru] == [
        "ruslit/Chekhov/Агафья.txt",
        "ruslit/Chekhov/Анюта.txt",
        "ruslit/Pushkin/Дубровский.txt",
    ]
    assert ru[1]["text"].endswith("Мороз и солнце, день чудесный.") and "Абзац 11 из Анюта" in ru[1]["text"]


def test_ppl_requests_score_like_wikitext(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_ppl_ru"]
    inst = requests(task, limit=1)[0]
    text = inst.doc["text"]
    assert inst.arguments == (text,)
    scores = task.process_results(inst.doc, [-100.0])
    n_bytes = len(text.encode("utf-8"))
    assert scores["byte_perplexity"] == (-100.0, n_bytes) and scores["bits_per_byte"] == (-100.0, n_bytes)
    assert scores["word_perplexity"] == (-100.0, len(text.split()))


# ---- identity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "ok", "mentions", "claims"),
    [
        ("I am Oracle, a helpful assistant.", 1, 1, 0),
        ("I was made by moeforge.", 1, 1, 0),
        ("No, I am not ChatGPT. I am Oracle.", 1, 1, 0),
        ("I'm Oracle, not ChatGPT.", 1, 1, 0),
        ("Меня зовут Oracle.", 1, 1, 0),
        ("I am ChatGPT, a large language model.", 0, 0, 1),
        ("I am Oracle. Actually, I am a large language model trained by OpenAI.", 0, 1, 1),
        ("Hi! My name is Claude.", 0, 0, 1),
        ("Я Qwen.", 0, 0, 1),
        ("I am a helpful assistant.", 0, 0, 0),
        ("The oracles of Delphi spoke in riddles.", 0, 0, 0),  # a word containing the name is not the name
    ],
)
def test_identity_metric(tasks: dict[str, Any], reply: str, ok: int, mentions: int, claims: int) -> None:
    task = tasks["moeforge_identity"]
    doc = next(iter(task.eval_docs))
    assert task.process_results(doc, [reply]) == {
        "identity_ok": float(ok),
        "mentions_name": float(mentions),
        "claims_other": float(claims),
    }


def test_identity_names_from_the_environment(tasks: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    task = tasks["moeforge_identity"]
    doc = next(iter(task.eval_docs))
    monkeypatch.setenv("MOEFORGE_IDENTITY_NAME", "Sage, Мудрец")
    assert task.process_results(doc, ["I am Sage."])["identity_ok"] == 1.0
    assert task.process_results(doc, ["Я Мудрец."])["identity_ok"] == 1.0
    assert task.process_results(doc, ["I am Oracle."])["identity_ok"] == 0.0
    monkeypatch.setenv("MOEFORGE_IDENTITY_OTHERS", "Sage")
    assert task.process_results(doc, ["I am Sage."])["claims_other"] == 1.0


def test_identity_prompts_and_the_project_identity(tasks: dict[str, Any]) -> None:
    import yaml

    task = tasks["moeforge_identity"]
    prompts = [d["prompt"] for d in task.eval_docs]
    assert len(prompts) == 10 and {"Who are you?", "What is your name?", "Are you ChatGPT?"} <= set(prompts)
    demo = yaml.safe_load((TASKS_DIR.parents[0] / "data" / "demo.yaml").read_text(encoding="utf-8"))
    defaults = module_of(task)["DEFAULT_IDENTITY_NAMES"]
    assert any(name in demo["identity"]["intros"]["*"] for name in defaults)  # "I am Oracle."
    assert any(name in demo["identity"]["system_prompts"]["*"] for name in defaults)


def test_identity_uses_the_chat_template_when_asked(tasks: dict[str, Any]) -> None:
    task = tasks["moeforge_identity"]

    def template(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    plain = requests(task, limit=1)[0].arguments[0]
    chat = requests(task, limit=1, apply_chat_template=True, chat_template=template)[0].arguments[0]
    assert plain == "Who are you?"
    assert chat == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"


# ---- the whole suite through lm-eval's evaluator ------------------------------------------------------


class ScriptedLM(LM):
    """Answers every request right: the gold number, the canonical solution, "I am Oracle.", the gold choice;
    rolling log-likelihood = -0.5 nat per byte."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            doc = r.doc
            if "entry_point" in doc:
                out.append(doc["canonical_solution"])
            elif "rationale" in doc:
                out.append(f" Worked it out.\n#### {doc['target']}")
            else:
                out.append("I am Oracle, not ChatGPT.")
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(0.0 if r.arguments[1].strip() == r.doc["target"] else -5.0, False) for r in requests]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [-0.5 * len(r.arguments[0].encode("utf-8")) for r in requests]


def test_suite_runs_through_the_evaluator(offline_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.evaluator import simple_evaluate

    monkeypatch.setenv("MOEFORGE_SANDBOX_TIMEOUT", "5")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = simple_evaluate(
        model=ScriptedLM(),
        tasks=["moeforge_offline"],
        task_manager=manager,
        confirm_run_unsafe_code=True,
        bootstrap_iters=0,
        log_samples=False,
    )
    results = out["results"]
    assert results["moeforge_gsm8k"]["exact_match,none"] == 1.0
    assert results["moeforge_gsm8k_mc"]["acc,none"] == 1.0
    assert results["moeforge_humaneval"]["pass@1,none"] == 1.0
    assert results["moeforge_identity"]["identity_ok,none"] == 1.0
    for name in ("moeforge_ppl_en", "moeforge_ppl_ru"):
        assert results[name]["bits_per_byte,none"] == pytest.approx(0.5 / math.log(2))
        assert results[name]["byte_perplexity,none"] == pytest.approx(math.exp(0.5))
    assert out["n-shot"]["moeforge_gsm8k"] == 5


def test_humaneval_needs_the_unsafe_code_confirmation(offline_env: Path) -> None:
    from lm_eval.evaluator import simple_evaluate

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with pytest.raises(ValueError, match="unsafe"):
        simple_evaluate(
            model=ScriptedLM(), tasks=["moeforge_humaneval"], task_manager=manager, bootstrap_iters=0
        )


# ---- where the data comes from ------------------------------------------------------------------------


def test_missing_data_root_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline_env: Path
) -> None:
    monkeypatch.delenv("MOEFORGE_EVAL_DATA")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")  # no ../shared/data from here
    with pytest.raises(ValueError, match=r"MOEFORGE_EVAL_DATA \(or MOEFORGE_REAL_DATA\)"):
        load("moeforge_gsm8k")
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"\$MOEFORGE_REAL_DATA=.*nowhere.* is not a directory"):
        load("moeforge_ppl_en")
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"humaneval/HumanEval\.jsonl\.gz is missing under the data root"):
        load("moeforge_humaneval")


def test_data_root_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline_env: Path) -> None:
    monkeypatch.delenv("MOEFORGE_EVAL_DATA")
    # MOEFORGE_REAL_DATA when MOEFORGE_EVAL_DATA is unset
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(offline_env))
    assert len(load("moeforge_humaneval")["tasks"]["moeforge_humaneval"].eval_docs) == 3
    # ../shared/data relative to the current directory
    monkeypatch.delenv("MOEFORGE_REAL_DATA")
    write_data_root(tmp_path / "shared" / "data")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert len(load("moeforge_ppl_ru")["tasks"]["moeforge_ppl_ru"].eval_docs) == 3
    # --metadata '{"data_root": ...}' wins over everything
    monkeypatch.setenv("MOEFORGE_EVAL_DATA", str(tmp_path / "nowhere"))
    loaded = load("moeforge_gsm8k", metadata={"data_root": str(offline_env)})
    assert len(loaded["tasks"]["moeforge_gsm8k"].eval_docs) == 4
