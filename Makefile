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
DASHBOARD_PORT ?= 8080

# Offline, quiet services everywhere (docs/platform.md). Ray's single-node address setting lives in
# orchestration/env.py: exported here it would break multi-node clusters.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export AWS_EC2_METADATA_DISABLED := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: image cluster-up cluster-sweep cluster-reproduce cluster-down
.PHONY: help setup install-command test test-unit test-integration test-services test-all lint pretrain train sweep ui dashboard reproduce report bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) MANIFEST=$(MANIFEST) TABLE=$(TABLE) TORCH=$(TORCH) RESUME=1 DRY_RUN=1"

# torch's build comes from constraints-$(TORCH).txt; scripts/pip_sources.py adds the public PyTorch CPU
# wheel index unless the machine's own pip sources already hold that exact build (then setup stays
# offline). TORCH_INDEX=URL|none overrides (docs/install.md). `make install-command` prints the command.
PIP_INSTALL = $(PY) -m pip install -c constraints-$(TORCH).txt $$($(PYTHON) scripts/pip_sources.py $(TORCH)) -r requirements.lock
# pip's notice about the machine's find-links folder holding non-package files is noise, not an error.
PIP_QUIET = 2>&1 | { grep -v "is ignored: it is neither" || true; }

$(VENV)/.installed: requirements.lock constraints-$(TORCH).txt pyproject.toml scripts/pip_sources.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP_INSTALL) -q $(PIP_QUIET)
	set -o pipefail; $(PY) -m pip install -q --no-deps -e . $(PIP_QUIET)
	$(PY) -c "import torch, s4mc, orchestration; print('torch', torch.__version__)"
	@touch $@

# PREBUILT=1 (set by docker/Dockerfile): the image already carries the environment in $(VENV); never
# rebuild it on a cluster node, only check that it is there.
ifeq ($(PREBUILT),1)
setup:
	@test -x $(PY) || { echo "error: PREBUILT=1 but $(PY) does not exist; unset PREBUILT or set VENV"; exit 1; }
else
setup: $(VENV)/.installed ## build the virtualenv (Python 3.11, pinned; TORCH=cuda for a GPU build)
endif

install-command: ## print the pip command `make setup` runs here (TORCH=cpu|cuda, TORCH_INDEX=URL|none)
	@echo $(PIP_INSTALL)

test: setup ## run the test suite: the unit, integration and services tiers (slow and gpu tests are opt-in)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-unit: setup ## the unit tier alone: no training, no servers (about a minute on 2 cores)
	$(PY) -m pytest -m "not integration and not services and not slow and not gpu" $(PYTEST_ARGS)

test-integration: setup ## the integration tier: tiny trainings, command lines in subprocesses
	$(PY) -m pytest -m "integration and not services and not slow and not gpu" $(PYTEST_ARGS)

test-services: setup ## the services tier: real Ray, MLflow, S3 and PostgreSQL on loopback
	$(PY) -m pytest -m "services and not slow and not gpu" $(PYTEST_ARGS)

test-all: setup ## run every test including slow ones (gpu tests skip without CUDA)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff (style, imports, bugbear, complexity <= 10: pyproject.toml)
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

dashboard: setup ## serve optuna-dashboard on 127.0.0.1 (DASHBOARD_PORT=8080) over the sweep's Optuna study
	$(PY) -m orchestration.dashboard --manifest $(MANIFEST) --port $(DASHBOARD_PORT) $(ARGS)

report: setup ## render a table from the MLflow runs: make report TABLE=table1
	$(VENV)/bin/s4mc-sweep report --table $(TABLE) $(ARGS)

bench: setup ## benchmark refinement + DPA time as a fraction of a training step
	$(PY) scripts/bench_refine.py --step-options $(ARGS)

# --- images and the AWS Ray cluster (README.md, "Cluster"; docs/cluster.md) ---------------------------
IMAGE ?=
STORAGE ?=
CLUSTER_FILE := .cluster/ray-cluster.yaml

image: ## build the s4mc image: make image IMAGE=registry/s4mc:tag [TORCH=cuda] [PUSH=1]
	@test -n "$(IMAGE)" || { echo "error: IMAGE is not set; e.g. make image IMAGE=ghcr.io/you/s4mc:0.1.0-cuda TORCH=cuda"; exit 1; }
	docker build -f docker/Dockerfile --build-arg TORCH=$(TORCH) -t $(IMAGE) .
	$(if $(PUSH),docker push $(IMAGE),@echo "not pushed (PUSH=1 pushes it)")

cluster-up: setup ## start the AWS Ray cluster with your pushed image: make cluster-up IMAGE=...
	$(PY) -m orchestration.cluster --image "$(IMAGE)" --out $(CLUSTER_FILE)
	$(VENV)/bin/ray up -y $(CLUSTER_FILE)

cluster-sweep: setup ## run a sweep on the cluster: make cluster-sweep MANIFEST=... STORAGE=s3://bucket/sweeps
	@test -n "$(STORAGE)" || { echo "error: STORAGE is not set; the cluster's nodes share only S3, e.g. STORAGE=s3://my-bucket/sweeps"; exit 1; }
	$(VENV)/bin/ray exec $(CLUSTER_FILE) "cd /opt/s4mc && RAY_ADDRESS=auto make sweep MANIFEST=$(MANIFEST) $(if $(RESUME),RESUME=1,) ARGS='storage=$(STORAGE)/$(basename $(notdir $(MANIFEST))) ray.autoscaling=true $(ARGS)'"

cluster-reproduce: setup ## launch a paper table on the cluster: make cluster-reproduce TABLE=table1
	$(VENV)/bin/ray exec $(CLUSTER_FILE) "cd /opt/s4mc && RAY_ADDRESS=auto make reproduce TABLE=$(TABLE) $(if $(RESUME),RESUME=1,) ARGS='$(ARGS)'"

cluster-down: setup ## stop the cluster's nodes
	$(VENV)/bin/ray down -y $(CLUSTER_FILE)

clean: ## remove run folders and caches (keeps the virtualenv)
	rm -rf runs .pytest_cache .ruff_cache
