# bonehpc — every user-facing action is a target here.
# Variables: CONFIG, PROFILE (slurm/clusters/<name>.yaml), MODE (auto|slurm|local|debug), ARGS (extra key=value
# overrides), EXP, RUN_ROOT (the folder holding EXP: the config's run_root, default runs), PARAMS
# (e.g. runs/<exp>/tune/best_params.yaml), TRIALS, PARALLEL, STUDY,
# DRY_RUN=1 (submit targets: print the sbatch scripts and the dependency graph, submit nothing).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
PROFILE ?=
EXP ?= demo
PARAMS ?=
RUN_ROOT ?= runs
TRIALS ?= 6
PARALLEL ?= 2
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
SLURM_CI_ROOT ?= /tmp/bonehpc-slurm
export SLURM_CI_ROOT
MODE ?=
INPUT ?= data/demo/MURA-v1.1/valid_image_paths.csv
OUT ?=
BENCH_ARGS ?=
ARGS ?=
# q: one shell word, whatever the value holds (space, quote, ;, $$(...), backtick); ARGS and BENCH_ARGS stay
# lists of words on purpose (key=value overrides, options).
q = '$(subst ','\'',$(1))'
PROFILE_ARG := $(if $(PROFILE),$(call q,cluster.profile=$(PROFILE)),) $(if $(MODE),$(call q,cluster.mode=$(MODE)),) $(ARGS)
PARAMS_ARG := $(if $(PARAMS),--params $(call q,$(PARAMS)),)
DRY_RUN ?=
DRY_ARG := $(if $(DRY_RUN),--dry-run,)


.PHONY: help setup demo test test-unit verify lint format typecheck pack submit-folds submit-tune submit-all \
        resubmit status report tune-status predict bench dev-cluster-up dev-cluster-down clean tensorboard

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(BIN)/.stamp: pyproject.toml
	@command -v $(PY) >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip; }
	@$(PY) -m venv $(VENV) 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/.stamp ## create .venv and install bonehpc (idempotent; fast when done)

demo: setup ## run the whole pipeline on synthetic MURA-layout data, locally, on the CPU
	$(BIN)/bonehpc demo --config $(call q,$(CONFIG)) $(PROFILE_ARG)

test: setup ## all tests: unit + integration on the real dev Slurm cluster (brought up and down here)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }  # the report's browser test
	bash slurm/dev/with-cluster.sh $(BIN)/python -m pytest -q tests

test-unit: setup ## unit tests only (no Slurm)
	$(BIN)/python -m pytest -q tests/unit

lint: setup ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: setup ## mypy on bonehpc/
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

pack: setup ## pack the data set of CONFIG into HDF5 shards (here; `bonehpc submit pack` does it as a Slurm array)
	$(BIN)/bonehpc pack --config $(call q,$(CONFIG)) $(ARGS)

verify: setup ## full check (SHA-256) of the shards of CONFIG
	@shards="$$($(BIN)/bonehpc config --config $(call q,$(CONFIG)) $(ARGS) | $(BIN)/python -c 'import sys,yaml; print(yaml.safe_load(sys.stdin)["data"]["shards"])')" && \
	  set -x && $(BIN)/bonehpc verify --full -- "$$shards"

submit-folds: setup ## submit the cross-validated teacher+student experiment of CONFIG (PROFILE=, PARAMS=)
	$(BIN)/bonehpc submit folds --config $(call q,$(CONFIG)) $(PARAMS_ARG) $(DRY_ARG) $(PROFILE_ARG)

resubmit: setup ## resubmit only failed/cancelled/timed-out tasks of EXP
	$(BIN)/bonehpc submit resubmit --exp $(call q,$(EXP)) --run-root $(call q,$(RUN_ROOT))

status: setup ## per fold and role: state, elapsed, exit code, requeues (sacct)
	$(BIN)/bonehpc status --exp $(call q,$(EXP)) --run-root $(call q,$(RUN_ROOT))

submit-tune: setup ## Optuna study as a Slurm array: TRIALS=N PARALLEL=P
	$(BIN)/bonehpc submit tune --config $(call q,$(CONFIG)) $(DRY_ARG) $(PROFILE_ARG) $(call q,tune.trials=$(TRIALS)) $(call q,tune.parallel=$(PARALLEL))

submit-all: setup ## folds + tune study (trials wait for their teachers) + the folds again with the best params, all queued at once
	$(BIN)/bonehpc submit all --config $(call q,$(CONFIG)) $(DRY_ARG) $(PROFILE_ARG) $(call q,tune.trials=$(TRIALS)) $(call q,tune.parallel=$(PARALLEL))

tune-status: setup ## Optuna study of EXP: trials by state, best params (-> runs/EXP/tune/best_params.yaml)
	$(BIN)/bonehpc tune status --exp $(call q,$(EXP)) --run-root $(call q,$(RUN_ROOT)) $(if $(STUDY),--study $(call q,$(STUDY)),)

TB_PORT ?= 6006
tensorboard: setup ## live curves of EXP (folds, roles, tune trials side by side): http://localhost:TB_PORT
	$(BIN)/tensorboard --logdir $(call q,$(RUN_ROOT)/$(EXP)) --port $(call q,$(TB_PORT))

report: setup ## aggregated report of EXP: runs/EXP/report/index.html
	$(BIN)/bonehpc report --exp $(call q,$(EXP)) --run-root $(call q,$(RUN_ROOT))

predict: setup ## abnormality probabilities for INPUT (folder of PNGs or CSV) with the student fold ensemble of EXP
	$(BIN)/bonehpc predict --model $(call q,$(RUN_ROOT)/$(EXP)) --input $(call q,$(INPUT)) --out $(call q,$(or $(OUT),$(RUN_ROOT)/$(EXP)/predict/preds.csv))

bench: setup ## benchmarks, ratios side by side (JSON + table); sizes via BENCH_ARGS="--image-size 224 ..."
	$(BIN)/bonehpc bench all $(BENCH_ARGS)

dev-cluster-up: ## start the local real Slurm 22.05 cluster (installs Debian packages when missing)
	bash slurm/dev/up.sh

dev-cluster-down:
	bash slurm/dev/down.sh

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
