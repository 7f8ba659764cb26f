"""The decode thread policy (moeforge.serve.threads): the rule from batch size and load, the override,
the caller's torch thread count put back, and greedy tokens that do not depend on the thread count."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import load_model_config
from moeforge.model.layers import SwiGLUDecode
from moeforge.model.transformer import MoETransformer
from moeforge.serve import decode as decode_mod
from moeforge.serve import threads as threads_mod
from moeforge.serve.decode import Decoder, _Packed
from moeforge.serve.engine import Engine, EngineError
from moeforge.serve.sampling import SamplingParams
from moeforge.serve.threads import DecodeThreads, LoadMonitor, choose_threads, threads_from_env

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _model(overrides: list[str] | None = None) -> MoETransformer:
    torch.manual_seed(0)  # untied: a random tied model's argmax is the last input token
    return MoETransformer(load_model_config("tiny", ["tie_embeddings=false", *(overrides or [])])).eval()


class _FixedLoad(LoadMonitor):
    """A monitor that reads ``value`` instead of the machine."""

    def __init__(self, value: float) -> None:
        self.value = value

    def others(self) -> float:
        return self.value


# ------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    ("batch", "cpus", "others", "one_row", "expected"),
    [
        (8, 2, 0.0, None, 2),  # quiet: every core
        (8, 2, 0.2, None, 2),  # a little background work leaves the core free
        (8, 2, 0.5, None, 1),  # half a core taken: the thread behind it would stall every barrier
        (8, 2, 2.0, None, 1),  # both cores taken (the benchmark's two busy loops)
        (8, 2, 7.0, None, 1),  # never fewer than one
        (8, 16, 3.0, None, 13),
        (1, 2, 0.0, None, 2),  # a dense model's one row: oneDNN's GEMV on every free core
        (1, 2, 0.0, 1, 1),  # an MoE model's one row: one thread
        (1, 2, 2.0, None, 1),
        (8, 2, 0.0, 1, 2),  # the one-row limit leaves larger batches alone
        (None, 2, 0.0, 1, 2),  # a prefill: the free cores whatever the batch
        (None, 2, 1.0, None, 1),
    ],
)
def test_threads_follow_the_batch_size_and_the_free_cores(
    batch: int | None, cpus: int, others: float, one_row: int | None, expected: int
) -> None:
    assert choose_threads(batch, cpus, others, one_row=one_row) == expected


def test_more_load_never_means_more_threads() -> None:
    for batch in (1, 2, 8, 64, None):
        for cpus in (1, 2, 8):
            counts = [
                choose_threads(batch, cpus, x / 10, one_row=1 if batch == 2 else None) for x in range(100)
            ]
            assert counts == sorted(counts, reverse=True)
            assert all(1 <= c <= cpus for c in counts)


@pytest.mark.parametrize(("batch", "cpus"), [(0, 2), (4, 0)])
def test_choose_threads_refuses_nonsense(batch: int, cpus: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        choose_threads(batch, cpus, 0.0)


def test_the_environment_variable_fixes_the_count_or_says_what_is_wrong() -> None:
    assert threads_from_env("") is None
    assert threads_from_env("auto") is None
    assert threads_from_env(" 3 ") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="MOEFORGE_DECODE_THREADS"):
            threads_from_env(bad)


# ------------------------------------------------------------------------------------------ the load
def test_load_monitor_counts_the_rest_of_the_machine_not_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"machine": 100.0, "own": 10.0, "wall": 1000.0}
    monkeypatch.setattr(threads_mod, "_machine_busy_seconds", lambda: (clock["machine"], clock["wall"]))
    monkeypatch.setattr(threads_mod.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(threads_mod.time, "monotonic", lambda: clock["wall"])
    monitor = LoadMonitor(interval=0.25)
    monkeypatch.setattr(monitor, "_initial", lambda: 0.0)
    assert monitor.others() == 0.0  # no interval yet: the instantaneous reading (stubbed)
    # one wall second: the machine was busy 1.5 CPU-seconds, 0.5 of them ours -> 1 CPU of others
    clock.update(machine=101.5, own=10.5, wall=1001.0)
    assert monitor.others() == pytest.approx(1.0)
    clock["wall"] += 0.1  # within the interval: the last value, no new reading
    assert monitor.others() == pytest.approx(1.0)
    # a quiet second: the smoothed value halves
    clock.update(machine=102.5, own=11.5, wall=1002.1)
    assert monitor.others() == pytest.approx(0.5)


def test_load_monitor_reads_this_machine() -> None:
    monitor = LoadMonitor(interval=0.0)
    x = sum(i * i for i in range(200_000))  # some CPU time of our own between the readings
    assert x > 0
    assert monitor.others() >= 0.0


# ------------------------------------------------------------------------------------------ applying it
def test_a_fixed_count_is_used_whatever_the_batch_and_load() -> None:
    policy = DecodeThreads(3, cpus=2, monitor=_FixedLoad(5.0))
    assert policy.threads_for(1) == 3
    assert policy.threads_for(8) == 3
    with pytest.raises(ValueError, match="decode_threads"):
        DecodeThreads(0)


def test_automatic_count_comes_from_the_monitor() -> None:
    quiet, busy = (
        DecodeThreads(cpus=2, monitor=_FixedLoad(0.0)),
        DecodeThreads(cpus=2, monitor=_FixedLoad(2.0)),
    )
    assert (quiet.threads_for(8), quiet.threads_for(1)) == (2, 2)
    assert (busy.threads_for(8), busy.threads_for(1)) == (1, 1)


@pytest.mark.parametrize(("vendor", "one_row"), [("AuthenticAMD", 1), ("", 1), ("GenuineIntel", None)])
def test_the_decoder_limits_an_moe_models_one_row_steps_by_cpu(
    monkeypatch: pytest.MonkeyPatch, vendor: str, one_row: int | None
) -> None:
    monkeypatch.setattr(decode_mod, "cpu_vendor", lambda: vendor)
    assert Decoder(_model(), 8).threads.one_row == one_row
    assert Decoder(_model(["moe=null"]), 8).threads.one_row is None
    policy = DecodeThreads(cpus=2, monitor=_FixedLoad(0.0), one_row=2)
    assert Decoder(_model(), 8, threads=policy).threads.one_row == 2  # an explicit limit stays


@pytest.mark.parametrize(
    ("vendor", "first"), [("GenuineIntel", "mkl"), ("AuthenticAMD", "onednn"), ("", "onednn")]
)
def test_the_prepacked_kernel_tried_first_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, vendor: str, first: str
) -> None:
    assert decode_mod.default_kernels(vendor)[0] == first
    assert sorted(decode_mod.default_kernels(vendor)) == ["mkl", "onednn"]
    monkeypatch.setattr(decode_mod, "cpu_vendor", lambda: vendor)
    assert Decoder(_model(), 8).kernels[0] == first
    assert Decoder(_model(), 8, kernels=("onednn",)).kernels == ("onednn",)  # an explicit order stays


def test_the_cpu_vendor_is_read_from_proc_cpuinfo() -> None:
    vendor = decode_mod.cpu_vendor()
    assert isinstance(vendor, str)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        assert vendor == ""
        return
    if "vendor_id" in text:
        assert vendor and vendor in text


def test_a_step_runs_on_the_policys_count_and_the_callers_count_comes_back() -> None:
    torch.set_num_threads(2)
    policy = DecodeThreads(1)
    with policy.use(8) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), policy.use(8):
        raise RuntimeError("a failing step")
    assert torch.get_num_threads() == 2
    assert policy.used[1] == 2 and policy.last == 1


def test_a_hold_keeps_the_steps_count_for_the_sampling_and_restores_at_its_end() -> None:
    torch.set_num_threads(2)
    policy = DecodeThreads(cpus=2, monitor=_FixedLoad(0.0), one_row=1)
    with policy.hold(1):
        assert torch.get_num_threads() == 2  # the prefill: both free cores
        with policy.use(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # what follows the step (sampling) stays on it
    assert torch.get_num_threads() == 2


# ------------------------------------------------------------------------------------------ the engine
def test_engine_takes_the_override_from_its_argument_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    monkeypatch.delenv(threads_mod.ENV_VAR, raising=False)
    assert Engine(model).decoder.threads.fixed is None
    assert Engine(model, decode_threads=1).decoder.threads.fixed == 1
    monkeypatch.setenv(threads_mod.ENV_VAR, "2")
    assert Engine(model).decoder.threads.fixed == 2
    assert Engine(model, decode_threads=1).decoder.threads.fixed == 1  # the argument wins
    monkeypatch.setenv(threads_mod.ENV_VAR, "many")
    with pytest.raises(EngineError, match="MOEFORGE_DECODE_THREADS"):
        Engine(model)
    with pytest.raises(EngineError, match="decode_threads"):
        Engine(model, decode_threads=0)


def test_generate_and_stream_give_the_caller_its_thread_count_back() -> None:
    model = _model()
    torch.set_num_threads(2)
    for decode_threads in (None, 1):
        engine = Engine(model, decode_threads=decode_threads)
        engine.generate([[1, 2, 3], [4, 5]], GREEDY)
        assert torch.get_num_threads() == 2
        for _ in engine.stream([1, 2, 3], GREEDY):
            assert torch.get_num_threads() == 2  # the consumer's code runs on its own count
        assert torch.get_num_threads() == 2
        assert sum(engine.decoder.threads.used.values()) > 0


def test_the_models_own_forward_follows_the_thread_policy_too() -> None:
    """Without the decode path (fast_decode=False) each step's forward still runs on the policy's count:
    on a busy machine a forward on every core waits at each op's barrier like the decode path would."""
    model = _model()
    torch.set_num_threads(2)
    engine = Engine(model, fast_decode=False, decode_threads=1)
    assert engine.decoder is None and engine.threads is not None
    seen: list[int] = []
    forward = model.forward

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    try:
        completions = engine.generate([[1, 2, 3], [4, 5]], GREEDY)
    finally:
        del model.forward
    assert all(c.token_ids for c in completions)
    assert seen and set(seen) == {1}  # the prefill and every step
    assert engine.threads.used[1] > 0 and torch.get_num_threads() == 2  # the caller's count is back


@pytest.mark.parametrize("overrides", [[], ["moe=null"]], ids=["moe", "dense"])
def test_greedy_tokens_do_not_depend_on_the_thread_count(overrides: list[str]) -> None:
    model = _model(overrides)
    prompts = torch.randint(
        0, model.cfg.vocab_size, (8, 6), generator=torch.Generator().manual_seed(1)
    ).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = [c.token_ids for c in Engine(model, fast_decode=False).generate(prompts, params)]
    for decode_threads in (1, 2, None):
        engine = Engine(model, decode_threads=decode_threads)
        for batch in (prompts, prompts[:1]):
            got = [c.token_ids for c in engine.generate(batch, params)]
            assert got == reference[: len(batch)], f"decode_threads={decode_threads}, batch {len(batch)}"


def test_decode_logits_agree_across_thread_counts() -> None:
    model = _model()
    decoders = {n: Decoder(model, 8, threads=DecodeThreads(n)) for n in (1, 2)}
    ids = torch.randint(0, model.cfg.vocab_size, (8, 5), generator=torch.Generator().manual_seed(2))
    logits = {}
    with torch.inference_mode():
        for n, dec in decoders.items():
            cache = model.new_cache(8, 8)
            model(ids, cache=cache)
            logits[n] = dec.step(ids[:, -1], torch.full((8,), 5), cache)
    torch.testing.assert_close(logits[1], logits[2], rtol=1e-5, atol=1e-5)


def test_dense_mlps_get_prepacked_matrices_too() -> None:
    dec = Decoder(_model(["moe=null"]), 8)
    mlps = [b.mlp for b in dec.form.blocks]
    assert all(isinstance(m, SwiGLUDecode) for m in mlps)
    assert all(isinstance(m.gate_up, _Packed) and isinstance(m.down, _Packed) for m in mlps)
    x = torch.randn(8, dec.model.cfg.d_model)
    for m in mlps:  # any row count, the one-row GEMV included
        for rows in (1, 3, 8):
            torch.testing.assert_close(m.gate_up(x[:rows]), x[:rows] @ m.gate_up.wt_IO, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_tokens() -> None:
    model = _model()
    prompts = torch.randint(
        0, model.cfg.vocab_size, (4, 6), generator=torch.Generator().manual_seed(3)
    ).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    eager = Engine(model, decode_threads=1)
    compiled = Engine(model, decode_threads=1)
    compiled.decoder = Decoder(model, 8, threads=DecodeThreads(1), compile=True)
    assert compiled.decoder.kernels == ("onednn",)  # MKL's packed GEMM cannot be lowered
    assert [c.token_ids for c in compiled.generate(prompts, params)] == [
        c.token_ids for c in eager.generate(prompts, params)
    ]


def test_one_row_goes_through_onednn_on_several_threads_and_the_gemv_on_one() -> None:
    w = torch.randn(96, 64)
    lin = _Packed(w, rows=8, kernels=("onednn",))
    if lin.kind != "onednn":
        pytest.skip("this torch build has no oneDNN prepacked linear")
    x = torch.randn(1, 64)
    for n, threaded in ((1, False), (2, True)):
        torch.set_num_threads(n)
        assert lin._threaded_gemv() is threaded
        torch.testing.assert_close(lin(x), x @ w.t(), rtol=1e-5, atol=1e-5)
