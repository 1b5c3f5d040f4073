# Pet detector: from raw data to a live endpoint. `make` lists the targets.

PYTHON_SYSTEM ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
PYTEST_ARGS ?=
# The demo's params: the embedded sample, the tiny model and a training budget that CPUs finish
# in about 3 minutes (README: make demo).
DEMO_PARAMS ?= dataset=sample model=retinanet_tiny train.steps=1000 train.learning_rate=0.002 \
	train.warmup_steps=100 train.class_loss_weight=10 train.checkpoint_every=250

# DVC must never phone home: the build machines have no internet.
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help setup test lint demo repro bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^## / {printf "\n%s\n", substr($$0, 4)} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

## Set-up
setup: $(VENV)/.installed ## create .venv with the pinned stack, install nginx if missing
	@command -v nginx >/dev/null || { echo "installing nginx (apt)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx; }
	@echo "setup done: $(VENV) ready, nginx $$(nginx -v 2>&1 | cut -d/ -f2)"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

test: lint ## lint, then run the whole test suite (offline)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: ## ruff on the code
	$(VENV)/bin/ruff check .

## Pipeline
demo: ## the whole pipeline on the embedded sample with the tiny model, as a DVC experiment (CPU, minutes)
	$(DVC) exp run $(addprefix -S ,$(DEMO_PARAMS))
	@echo "demo done: metrics/eval.json, plots/, models/; params.yaml now holds the demo's values" \
	  "('git checkout params.yaml' returns to the real run)"

repro: ## dvc repro: the real run with params.yaml as it is
	$(DVC) repro

bench: ## print the speed benchmarks (figures and ratios against in-run baselines)
	$(PYTHON) -m benchmarks.tfrecord_throughput
	$(PYTHON) -m benchmarks.demo_pipeline

clean: ## remove generated artefacts (not the download cache)
	rm -rf data/raw data/records metrics plots build models
