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

.PHONY: setup run test bench calibrate gpu-check gpu-wheels gpu-site lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: setup  ## the whole default pipeline through DVC
	@test -d .dvc || { echo "no .dvc/: run from a clone of the genpipe repository" >&2; exit 1; }
	$(BIN)/genpipe repro
	$(BIN)/genpipe results   # the table in README.md and BENCHMARKS.md, on the built-in default data only

# Two test processes: most tests wait on process and server start-up, which overlap. `loadfile` keeps
# each test file in one process, in order, so a module's shared fixture is built once.
PYTEST_WORKERS ?= 2

test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest -q -ra --durations=20 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup  ## benchmarks; figures go to BENCHMARKS.md (the diffusion part needs `make run` first)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.diffusion
	$(BIN)/python -m benchmarks.priors
	$(BIN)/python -m benchmarks.scale   # cost curves over 2k..1M shapes (~1-2 h on 2 cores): BENCHMARKS.md "Scale"
	$(BIN)/python -m benchmarks.scale_cluster   # two nodes: training from the bucket vs local disk (~15 min)
	$(BIN)/python -m benchmarks.judge_sanity   # the judge against broken sample sets on 32x32 RGB glyphs (~5 min)

# The runs `genpipe repro --dry-run`'s estimates are fitted to (pipelines/estimate.py's REFERENCES):
# every training stage on digits and with the rgb32 preset, in a scratch clone of HEAD (~30 min; idle machine).
calibrate: setup
	@d=$$(mktemp -d) && git clone -q . $$d/ws && PYTHONPATH=$$d/ws $(BIN)/python -m benchmarks.calibrate \
	  --workspace $$d/ws --out reports/calibrate.json; rc=$$?; rm -rf $$d; exit $$rc

gpu-check: setup  ## the training loop on CUDA with bf16 autocast (see BENCHMARKS.md, "GPU check")
	$(BIN)/python -m benchmarks.gpu_check

# The lent GPU machine (Python 3.12, PyTorch, no network) lacks pydantic: its wheels, for the device
# tool's `carry`, at the versions this venv runs.
gpu-wheels: setup
	rm -rf .whl && $(BIN)/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $$($(BIN)/python -c "from importlib.metadata import version as v; \
	  print(' '.join(f'{n}=={v(n)}' for n in ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection')))")

# Ray, MLflow, DVC and the rest the real pipeline needs on that machine, in one file for `carry`: then
# `scripts/gpu-stages.sh repro [--preset NAME] TARGET...` there (docs/scale-out.md, "On a GPU machine
# without Ray or a network").
gpu-site: setup
	scripts/gpu-stages.sh pack --out .gpr/site.tar.xz

lint: setup
	$(BIN)/ruff check components pipelines tests benchmarks
	$(BIN)/ruff format --check components pipelines tests benchmarks

format: setup
	$(BIN)/ruff format components pipelines tests benchmarks
	$(BIN)/ruff check --fix components pipelines tests benchmarks

clean:
	rm -rf .genpipe .pytest_cache
