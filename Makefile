# The two set-up commands of the README are `make run` and `make test`; both build the venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install constraints run test lint typecheck unit bench bench-peers reliability deploy-test clean

# Everything (the server, s3, mlflow and the test tools) at the versions constraints.txt pins.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Rewrites constraints.txt from the venv (after changing a range in pyproject.toml and
# installing): every distribution that the package and its extras need, pinned.
constraints:
	$(BIN)/python deploy/requirements.py lock > constraints.txt.new
	mv constraints.txt.new constraints.txt

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
# Its counterpart for the Docker deployment is `make deploy-test` below.
reliability: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -m reliability -s tests/integration/test_reliability.py

# The Dockerfile and docker-compose.yml for real (deploy/README.md): builds the image (cpu
# variant) and runs the stack with two workers; jobs over HTTP, a killed worker, down/up with
# nothing lost. Needs root or a Docker engine (installs docker.io, docker-compose, debootstrap
# when absent). Not in CI (.ci/run): a multi-GB image build, minutes on 2 cores.
deploy-test: $(STAMP)
	VENV=$(VENV) bash deploy/deploy-test.sh

# The peers the benchmarks compare against, installed offline-friendly: Lucent without its
# notebook dependencies (and the old kornia it was written for), WeightWatcher.
bench-peers: $(STAMP)
	$(BIN)/pip install -q --no-deps torch-lucent
	$(BIN)/pip install -q "kornia<=0.4.1" decorator ipython weightwatcher

bench: bench-peers
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
