# The README's two commands: `make test` and `make demo`.
# Both create .venv when missing; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo venv clean-venv

venv: $(STAMP)

# Reinstall whenever a requirements file or pyproject.toml changes; the stamp records the last
# install. The project itself is installed editable (pyproject.toml says why): code edits need
# no reinstall.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Two pytest workers (TEST_WORKERS) share the cores, one torch thread each: most end-to-end
# tests wait on processes they start, so two at a time keep both cores busy, and one thread
# per worker keeps OpenMP from spinning on a core the other worker holds. 2 cores: ~6 minutes.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

test: $(STAMP)
	$(PYTEST) tests

# The inner loop: everything but the end-to-end runs marked `slow` (training, demo, torchrun).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# The whole method on the embedded synthetic data: first stage, BECO and the CE baseline,
# testing with and without CRF; writes data/logging/demo/results.md, curves.png, samples.png.
# DEMO_ARGS passes options to tools/demo.py, e.g. make demo DEMO_ARGS="--seed 1 --out data/logging/demo_seed1";
# DEMO_ARGS="--seeds 0,1,2 --out data/logging/demo_seeds": every seed, mean ± std and the paired difference.
demo: $(STAMP)
	$(PY) tools/demo.py $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
