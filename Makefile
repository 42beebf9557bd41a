# One command each for the README's quick start: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-compiled lint check-dist soak bench bench-smoke clean

# Everything memsess's own work needs: [dev] (its test suite's extras, lint, types,
# packaging), [test] (what users' suites get), [bench] and every optional feature.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,test,bench,flask,django,quart,litestar,crypto,zstd,prometheus]'
	$(BIN)/python scripts/link-adapters
	touch $(STAMP)

setup: $(STAMP)
	scripts/ensure-memcached

demo: setup
	$(BIN)/memsess demo

test: setup lint
	MEMSESS_EXPECT_BUILD=pure $(BIN)/pytest -q

# The same suite on the compiled build (mypyc, built in place, removed afterwards).
# PYTHONPATH: the build's shared library (memsess_compiled__mypyc) sits at the top of
# the checkout, which the editable install does not put on sys.path (a wheel puts it
# in site-packages).
test-compiled: setup
	$(BIN)/python scripts/build-compiled
	PYTHONPATH=$(CURDIR) MEMSESS_EXPECT_BUILD=compiled $(BIN)/pytest -q; status=$$?; \
	$(BIN)/python scripts/build-compiled --clean; exit $$status

# mypy and lint-imports see adapters/ as memsess.adapters through the link (see the script).
lint: $(STAMP)
	$(BIN)/python scripts/link-adapters
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The wheel and the sdist, built, inspected, installed in fresh venvs and used (~1 min).
check-dist: setup
	$(BIN)/python scripts/check-dist

# Minutes of random single-server faults under two processes of session traffic,
# with a checker of every answer (tests/nemesis.py): `make soak NEMESIS_SECONDS=600`.
NEMESIS_SECONDS ?= 180
soak: setup
	NEMESIS_SECONDS=$(NEMESIS_SECONDS) $(BIN)/pytest -q -s tests/test_nemesis.py

bench: setup
	$(BIN)/pip install -q -e '.[bench,plot]'
	bench/run --wait-quiet 120

bench-smoke: setup
	bench/run --smoke

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
