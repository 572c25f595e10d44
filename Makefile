# Every target creates the virtualenv on first use, so a fresh machine needs only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-oldest lint docs docs-check demo bench gpu-check clean

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

# The oldest versions pyproject.toml allows (.ci/oldest-requirements.txt; the tests run on CPU),
# in a virtualenv of their own kept under the user's cache between runs (a new lock makes a
# new one); the package is installed into it from this clone (editable, without dependencies) at
# every run. A stated subset of the suite covers every public module (the doctests of src/ too;
# not the wheel's build and install, nor the example scripts, which the newest run covers);
# not FSDP2 (the fsdp2 config and tests/test_fsdp.py: torch's public fully_shard is newer than 2.3).
# .ci/run calls it after `make test`.
OLDEST_LOCK := .ci/oldest-requirements.txt
# Left out on the oldest set: FSDP2 (above), and `ImageClassifier(pretrained_file=...)`, which
# timm 1.0.21 with torch 2.3 reads as a JAX .npz checkpoint (KeyError 'embedding/kernel'): a
# known gap of the oldest versions, stated in the README's compatibility notes.
OLDEST_DESELECT ?= not fsdp2 and not local_weights_file
OLDEST_VENV ?= $(HOME)/.cache/lightning-nusam/venv-oldest-$(shell sha256sum $(OLDEST_LOCK) | cut -c1-12)
OLDEST_TESTS ?= tests/test_nuclear.py tests/test_power_iteration.py tests/test_l2_and_gaussian.py \
	tests/test_engine.py tests/test_policy.py tests/test_schedules.py tests/test_sam_optimizer.py \
	tests/test_fabric.py tests/test_ways_in.py tests/test_mixin.py tests/test_callback.py tests/test_dropin.py \
	tests/test_accumulation.py \
	tests/test_configs_and_cli.py tests/test_memory_and_bench.py tests/test_models_and_data.py src

# no prerequisite: the folder's name holds the lock's hash (a fresh clone's newer files must not
# make it again)
$(OLDEST_VENV)/.installed:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps -r $(OLDEST_LOCK)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|torchvision|lightning|timm|torchmetrics|jsonargparse|numpy)=='
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -k "$(OLDEST_DESELECT)" $(OLDEST_TESTS)

demo: $(VENV)/.installed-demo
	$(PY) -m lightning_nusam.demo

bench: install
	$(PY) benchmarks/memory_speed.py $(BENCH_ARGS)

# On a machine with one GPU: the CUDA tier (tests/test_cuda.py) and the step benchmark, under 8
# minutes on an H200 (compiled νSAM compiles once per model), results in OUT. No virtualenv and no network: GPU_PYTHON needs torch,
# lightning, timm, transformers and pytest (pytorch_optimizer for the peer SAM row, if present).
# make gpu-check GPU_PYTHON=python3 OUT=/some/dir   (GPU_CHECK_ARGS=--tiny: tiny models, anywhere)
GPU_PYTHON ?= python3
OUT ?= benchmarks/results/gpu_check
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH="$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache build dist site
