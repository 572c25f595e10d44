# Every target creates the virtualenv on first use, so a fresh machine needs only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint demo bench clean

# make bench BENCH_ARGS=--full   (or --device cuda --precision bf16 --batch-size 128)
BENCH_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests examples benchmarks

test: install lint
	$(PY) -m pytest

demo: install
	$(PY) -m lightning_nusam.demo --config configs/quickstart.yaml

bench: install
	$(PY) benchmarks/memory_speed.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
