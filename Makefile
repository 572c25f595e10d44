# Every target creates the virtualenv on first use, so a fresh machine needs only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint docs docs-check demo bench clean

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

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache build dist site
