# genpipe: `make run` trains the default pipeline, `make test` runs the whole test suite.
# Both create .venv/ and install what is missing (a stamp makes a no-op re-install take ~1 s).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
PYTEST_ARGS ?=

.PHONY: setup run test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: setup  ## the whole default pipeline through DVC
	@test -d .dvc || { echo "no .dvc/: run from a clone of the genpipe repository" >&2; exit 1; }
	$(BIN)/dvc repro

test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: setup  ## benchmarks; figures go to BENCHMARKS.md
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check components pipelines tests benchmarks
	$(BIN)/ruff format --check components pipelines tests benchmarks

format: setup
	$(BIN)/ruff format components pipelines tests benchmarks
	$(BIN)/ruff check --fix components pipelines tests benchmarks

clean:
	rm -rf .genpipe .pytest_cache
