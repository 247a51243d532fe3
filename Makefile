# The two set-up commands of the README are `make run` and `make test`; both build the venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/deepscope up

lint: $(STAMP)
	$(BIN)/ruff check deepscope tests bench
	$(BIN)/ruff format --check deepscope tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

# Faults, load and fuzzing against the real stack (minutes): run before calling hardening done.
reliability: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -m reliability -s tests/integration/test_reliability.py

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
