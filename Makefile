# Two commands on a fresh machine: `make run` and `make test`.  Everything they
# need (the venv, the patched pyuv wheel, the package) is built here, once.
PYTHON ?= python3
# One venv per interpreter, so that `make test PYTHON=python3.13` never reuses a 3.11 .venv.
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
WHEELS := .wheels
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 4433
PYTEST_ARGS ?=
DIST ?= dist
# Where each test run says which interpreter it used (CI runs several).
SAY_PYTHON = @$(PY) -c 'import sys; print(f"== {sys.argv[1]} on {sys.executable}, Python {sys.version.split()[0]}")'

.PHONY: all setup run test test-pure test-core lint soak bench dist clean memcheck asan hypothesis-long

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The stamp depends on what decides the install: re-run when they change.  tlsuv's
# runtime dependencies are downloaded as wheels beside pyuv's: `make dist` needs no network.
# The editable install also builds the optional C extension (setup.py) in place.
$(STAMP): $(PY) pyproject.toml setup.py tlsuv/_speedups.c scripts/build_pyuv.py
	$(PY) scripts/build_pyuv.py $(WHEELS)
	$(PY) -m pip download --quiet --dest $(WHEELS) --find-links $(WHEELS) .
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m tlsuv.echo --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(SAY_PYTHON) "make test"
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The whole suite on the pure-Python data path (CI runs both).
test-pure: $(STAMP)
	$(SAY_PYTHON) "make test-pure"
	TLSUV_NO_EXTENSIONS=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# What CI runs on every supported interpreter besides the default: the I/O-free core and
# the packaging round trip (make dist, an offline install, one TLS echo over loopback
# through the installed console script).
CORE_TESTS := tests/test_tls_core.py tests/test_proxy.py tests/test_packaging.py
test-core: $(STAMP)
	$(SAY_PYTHON) "make test-core"
	$(PY) -m pytest -m "not slow" $(CORE_TESTS) $(PYTEST_ARGS)

# Everything `pip install --no-index --find-links dist tlsuv` needs, for this venv's
# Python: tlsuv's sdist and wheel (the wheel built from the sdist, which checks the sdist
# is complete), the patched pyuv wheel, and the wheels of tlsuv's other dependencies.
# Offline: setup already put those in $(WHEELS).  `make dist PYTHON=python3.12` adds
# that interpreter's wheels to the same directory.
dist: $(STAMP)
	rm -f $(DIST)/tlsuv-*
	$(PY) -m build --no-isolation --outdir $(DIST) .
	$(PY) -m pip wheel --quiet --no-index --find-links $(WHEELS) --wheel-dir $(DIST) $(DIST)/tlsuv-*.whl
	@ls -1 $(DIST)

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

# The compiled data path's safety runs (docs/performance.md, "The compiled data path").
# memcheck: its own tests and the core tests on the compiled path under valgrind;
# asan: the whole suite with the extension built with AddressSanitizer and UBSan;
# hypothesis-long: the chunking property test with 2000 examples on the compiled path.
MEMCHECK_TESTS ?= tests/test_speedups.py tests/test_tls_core.py tests/test_server.py \
	-k "not fast and not public and not pure and not 500_concurrent"
# Under valgrind everything runs ~50x slower: five chunking examples, no per-test timeout,
# and not the 500-connection test (its clients give up on handshakes that slow).
memcheck: $(STAMP)
	TLSUV_REQUIRE_SPEEDUPS=1 TLSUV_HYPOTHESIS_EXAMPLES=5 \
		$(PY) scripts/memcheck.py $(MEMCHECK_TESTS) -q --timeout 0 $(PYTEST_ARGS)

ASAN_CFLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
# The ASan build replaces the in-place extension for the run and is put back after it, even
# when the run is interrupted (the EXIT trap; INT/TERM exit through it): the
# editable install's import hook finds tlsuv in the source tree whatever PYTHONPATH says.
# Only this venv's build: other interpreters' venvs (make setup PYTHON=...) leave theirs beside it.
# Left out: the tests whose third-party programs fail under the preloaded ASan runtime that
# every child process inherits -- gnutls-cli and systemd-socket-activate -- on either data
# path, with the extension not even loaded (TLSUV_NO_EXTENSIONS=1 fails them the same way);
# and testssl, whose hundreds of openssl runs, each with the runtime preloaded, time out.
ASAN_DESELECT := not gnutls and not systemd_socket_activate and not documented_service and not testssl
asan: $(STAMP)
	so=tlsuv/_speedups$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') && \
	cp "$$so" "$$so.keep" && \
	trap 'mv "$$so.keep" "$$so"' EXIT && trap 'exit 130' INT TERM && \
	$(CC) -shared -fPIC -Wall -Wextra $(ASAN_CFLAGS) \
		-I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" tlsuv/_speedups.c -o "$$so" && \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc \
		TLSUV_REQUIRE_SPEEDUPS=1 $(PY) -m pytest -p no:cacheprovider -m "not slow" \
		-k "$(ASAN_DESELECT)" $(PYTEST_ARGS)

hypothesis-long: $(STAMP)
	TLSUV_REQUIRE_SPEEDUPS=1 TLSUV_HYPOTHESIS_EXAMPLES=2000 \
		$(PY) -m pytest tests/test_tls_core.py -k "random_chunking and compiled" --timeout 3600 --hypothesis-show-statistics -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build $(DIST) *.egg-info .pytest_cache .mypy_cache .ruff_cache tlsuv/_speedups*.so
