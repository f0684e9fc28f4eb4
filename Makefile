# Two commands: `make run` (set up, then run the whole pipeline) and `make test` (system packages and set-up, then every
# test). Both create .venv from pinned versions once; later calls reuse it. `make test-fast`: the tests that need no
# pipeline run (lint, lib in sync, nbdev-test, unit tests). `make team-up` / `make team-down`: the team's MLflow server on
# PostgreSQL (README, "Working as a team"). `make scale-data FACTOR=10`: the data x10 for the files source (README,
# "The data ×N"). `make bench-scale`: the pipeline on the data ×1 and ×10 with both engines (README, "Scaling out").

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
KERNEL := mlops-template
# Packages are compiled to bytecode at install: with PYTHONDONTWRITEBYTECODE set, as on many CI machines, Python would
# otherwise compile pandas, scikit-learn, MLflow and DVC from source in every process (imports 2-3x slower).
# The stamp is keyed by the content of the pinned set, so touching the files (nbdev-export rewrites pyproject.toml) reinstalls nothing.
PINS   := $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.installed-$(PINS)
LAB_ARGS ?=
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast system-packages lab bench audit lint export team-up team-down recover restore-restricted scale-data bench-scale

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))" >/dev/null
	@touch $(STAMP)
	@echo "environment ready: $(VENV) (kernel $(KERNEL))"

run: setup
	dvc repro

test: system-packages setup
	bash tests/run_all.sh all

test-fast: setup
	bash tests/run_all.sh fast

system-packages:
	@bash tests/system_packages.sh

lab: setup
	jupyter lab --ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/

bench: setup
	python benchmarks/benchmark.py

# The real data ×1 and ×N (FACTORS, default 1 10) on both engines: time, memory, rows/s, same answers (README).
bench-scale: setup
	python benchmarks/scale.py $(if $(FACTORS),--factors $(FACTORS))

# A teammate after `dvc pull`: the raw contacts and the delivery file, which are never pushed, rebuilt from the source.
restore-restricted: setup
	restore-restricted

# The Complete Journey ×FACTOR as partitioned parquet in data/scaled/x$(FACTOR) (git-ignored, no DVC output), for the files
# source: data_acquisition.source: {kind: files, path: data/scaled/x$(FACTOR)}.
FACTOR ?= 10
scale-data: setup
	scale-data --factor $(FACTOR) --out data/scaled/x$(FACTOR)

# After a failed stage: failed executed notebooks to reports/failed/, every other output back to the last good state.
recover: setup
	recover-pipeline

audit: setup
	pip-audit --strict --no-deps --disable-pip -r requirements.lock

lint: setup
	ruff check lib tests benchmarks notebooks
	ruff format --check notebooks tests benchmarks

export: setup
	ruff format --quiet notebooks && nbdev-export && nbdev-clean

team-up: setup
	team-stack up

team-down: setup
	team-stack down
