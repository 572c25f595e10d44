# Every target creates the virtualenv on first use, so a fresh machine needs only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint docs docs-check demo bench gpu-check clean

# make bench BENCH_ARGS=--full   (or --accumulation, --cheaper-steps, --device cuda --precision bf16 ...)
BENCH_ARGS ?=

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

# everything (tests, docs, text models, benchmarks)
$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-demo

# what the demo needs: the package and its demo extra
$(VENV)/.installed-demo: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests examples benchmarks docs

# The documentation site (site/) from docs/, the README's pages and the docstrings (mkdocs.yml);
# --strict: a warning, a broken internal link or anchor fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-check: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir "$$(mktemp -d)"

test: install lint docs-check
	$(PY) -m pytest

demo: $(VENV)/.installed-demo
	$(PY) -m lightning_nusam.demo

bench: install
	$(PY) benchmarks/memory_speed.py $(BENCH_ARGS)

# On a machine with one GPU: the CUDA tier (tests/test_cuda.py) and the step benchmark, under 6
# minutes on an H200, results in OUT. No virtualenv and no network: GPU_PYTHON needs torch,
# lightning, timm, transformers and pytest (pytorch_optimizer for the peer SAM row, if present).
# make gpu-check GPU_PYTHON=python3 OUT=/some/dir   (GPU_CHECK_ARGS=--tiny: tiny models, anywhere)
GPU_PYTHON ?= python3
OUT ?= benchmarks/results/gpu_check
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH="$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache build dist site
