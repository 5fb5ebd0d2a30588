# The two commands of the README: `make demo` (the whole loop on the embedded default) and
# `make test`. Both set up a virtual environment first: torch==2.13.0 before the project,
# so that no CUDA build of torch is pulled on a machine without a GPU.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,test]'
	touch $@

.PHONY: install test demo bench
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/scf demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_bus.py
