# One command each for the README's quick start: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint soak bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench,flask,django]'
	touch $(STAMP)

setup: $(STAMP)
	scripts/ensure-memcached

demo: setup
	$(BIN)/memsess demo

test: setup lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

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
