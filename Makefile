# emc — two entry points: `make demo` (the main job on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps lint format typecheck test test-fast demo bench clean

# torch first, pinned to the CPU wheel on local disk (any other spec pulls GBs of CUDA);
# then everything else resolved through constraints.txt so every machine gets the same versions.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

# Chromium (browser tests) and redis-server (compose smoke test): Debian packages, root only.
# Elsewhere it says what to do.
system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy -p common -p services

test: install system-deps lint typecheck
	$(BIN)/pytest -q -ra --durations=15

test-fast: install
	$(BIN)/pytest -q -x -m "not slow and not browser"

demo: install
	$(BIN)/emc demo

bench: install
	$(BIN)/python bench/graph_size.py
	$(BIN)/python bench/validate_ranking.py
	$(BIN)/python bench/pipeline_overhead.py
	$(BIN)/python bench/recovery.py

clean:
	rm -rf var .cache test-artifacts .mypy_cache .ruff_cache .pytest_cache
