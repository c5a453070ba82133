# Two commands on a fresh machine: `make run` and `make test`.  Everything they
# need (the venv, the patched pyuv wheel, the package) is built here, once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHEELS := .wheels
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 4433
PYTEST_ARGS ?=

.PHONY: all setup run test lint soak bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The stamp depends on what decides the install: re-run when they change.
$(STAMP): $(PY) pyproject.toml scripts/build_pyuv.py
	$(PY) scripts/build_pyuv.py $(WHEELS)
	$(PY) -m pip install --quiet --find-links $(WHEELS) "pyuv==1.4.0"
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m tlsuv.echo --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tlsuv tests scripts
	$(VENV)/bin/mypy

soak: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The benchmark's own dependencies (uvloop, Twisted, matplotlib) stay out of
# `make test`: a separate extra, installed on first `make bench` and again
# whenever pyproject.toml changes.  BENCH_ARGS=--quick for a smoke run.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	PYTHONPATH=scripts $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
