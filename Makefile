# The user interface of the project. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# TORCH=cpu (default) pins torch's CPU build; TORCH=cuda installs the CUDA build on a GPU machine.
TORCH ?= cpu
CONFIG ?= experiments/embedded/cutmix_seg_s4mc.yaml
MANIFEST ?= experiments/sweeps/embedded_default.yaml
TABLE ?= embedded
PYTEST_ARGS ?=
UI_PORT ?= 5000

# Offline, quiet services everywhere (platform-notes.md). Ray's single-node address setting lives in
# orchestration/env.py: exported here it would break multi-node clusters.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export AWS_EC2_METADATA_DISABLED := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: help setup test test-all lint pretrain train sweep ui reproduce report bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) MANIFEST=$(MANIFEST) TABLE=$(TABLE) TORCH=$(TORCH) RESUME=1 DRY_RUN=1"

$(VENV)/.installed: requirements.lock constraints-$(TORCH).txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-$(TORCH).txt -r requirements.lock 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, s4mc, orchestration; print('torch', torch.__version__)"
	@touch $@

setup: $(VENV)/.installed ## build the virtualenv (Python 3.11, pinned; TORCH=cuda for a GPU build)

test: setup ## run the test suite (fast + services; slow and gpu tests are opt-in)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup ## run every test including slow ones (gpu tests skip without CUDA)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check s4mc orchestration tests scripts

pretrain: setup ## pretrain (or verify the cached) digit encoder of the embedded benchmark (~65 s once)
	$(VENV)/bin/s4mc pretrain

train: setup ## train one run: make train CONFIG=experiments/embedded/<name>.yaml ARGS="key=value ..."
	$(VENV)/bin/s4mc train --config $(CONFIG) $(ARGS)

sweep: setup pretrain ## run a sweep (embedded default offline; MANIFEST=..., RESUME=1)
	$(VENV)/bin/s4mc-sweep run --manifest $(MANIFEST) $(if $(RESUME),--resume,) $(ARGS)

ui: setup ## serve the MLflow UI on 127.0.0.1 (UI_PORT=5000) over the sweeps' store
	$(VENV)/bin/s4mc-sweep ui --manifest $(MANIFEST) --port $(UI_PORT)

reproduce: setup $(if $(DRY_RUN),,pretrain) ## launch a paper table's cells: make reproduce TABLE=table1 [DRY_RUN=1]
	$(VENV)/bin/s4mc-sweep reproduce --table $(TABLE) $(if $(DRY_RUN),--dry-run,) $(if $(RESUME),--resume,) $(ARGS)

report: setup ## render a table from the MLflow runs: make report TABLE=table1
	$(VENV)/bin/s4mc-sweep report --table $(TABLE) $(ARGS)

bench: setup ## benchmark refinement + DPA time as a fraction of a training step
	$(PY) scripts/bench_refine.py $(ARGS)

clean: ## remove run folders and caches (keeps the virtualenv)
	rm -rf runs .pytest_cache .ruff_cache
