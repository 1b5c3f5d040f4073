# Pet detector: from raw data to a live endpoint. `make` lists the targets.

PYTHON_SYSTEM ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
PYTEST_ARGS ?=
# make test: pytest-xdist workers (tests/conftest.py groups the tests and hands out the longest first), and
# TensorFlow's kernel threads per process: the cores shared among the workers, so that they do not compete
# for the same cores (the learning tests' recipes hold with one thread and with more). Running independent ops
# side by side keeps TensorFlow's default, a thread per core: it fills a core the other worker leaves idle
# (docs/testing.md has the measurements).
TEST_WORKERS ?= 2
TEST_TF_THREADS ?= $(shell w=$(TEST_WORKERS); n=$$(getconf _NPROCESSORS_ONLN); t=$$(( w > 1 ? n / w : n )); echo $$(( t > 0 ? t : 1 )))
# make rehearsal: the model file conf/model/<MODEL>.yaml it runs (empty: the default run's, retinanet_resnet50).
MODEL ?=
# Serving: the export folder (dvc.yaml's export stage writes it) and the local port.
EXPORT_DIR ?= models/export
MODEL_NAME ?= $(shell $(PYTHON) -m detkit.config.show export.model_name)
SERVE_PORT ?= 8080
URL ?= http://127.0.0.1:$(SERVE_PORT)/invocations
IMAGE ?=
# make batch: the folders (or s3:// prefixes) it reads and writes; DRAW=1 also draws each image.
INPUT ?=
OUTPUT ?=
DRAW ?=
# Deploy (AWS): empty means the deploy config group's value (conf/deploy/sagemaker.yaml).
# DEPLOY_IMAGE: custom (our image, built with Docker) or aws (AWS's TF Serving image, no Docker).
AWS_REGION ?=
DEPLOY_IMAGE ?=
IMAGE_TAG ?=
INSTANCE_TYPE ?=
# Passed as config overrides (Hydra's KEY=VALUE, the last arguments of every program's command line).
DEPLOY_OVERRIDES = $(if $(AWS_REGION),deploy.region=$(AWS_REGION)) $(if $(DEPLOY_IMAGE),deploy.image=$(DEPLOY_IMAGE)) \
	$(if $(IMAGE_TAG),deploy.image_tag=$(IMAGE_TAG)) $(if $(INSTANCE_TYPE),deploy.instance_type=$(INSTANCE_TYPE))
DEPLOY := $(PYTHON) -m detkit.cloud.deploy
# The demo's params: the embedded sample, the tiny model and a training budget CPUs finish in minutes
# (its measured time: README, make demo).
DEMO_PARAMS ?= dataset=sample model=retinanet_tiny train.steps=750 train.learning_rate=0.0015 \
	train.warmup_steps=100 train.class_loss_weight=10 train.checkpoint_every=250 train.eval_every=250

# make compare: DVC's table with --only-changed, narrow enough for a terminal. Always shown: the experiment,
# AP/AP50/AP75, parameter count, training images/s, the model and dataset picked. Of the rest, only
# params.yaml's keys that differ: the other metrics (AR100 among them), the creation time, dependency hashes
# and the group files' keys are dropped (the group's column already names the file that ran, and two
# families' model files differ in every key).
COMPARE_WIDTH ?= 160
COMPARE_KEEP = ^(Experiment|AP|AP50|AP75|parameters|train_images_per_second|model|dataset)$$
PARAMS_SECTIONS := $(shell sed -n 's/^\([a-z_]*\):.*/\1/p' params.yaml | paste -sd'|' -)
COMPARE_DROP = ^(?!($(PARAMS_SECTIONS))(\.|$$)).*
MLFLOW_PORT ?= 5000

# DVC must never phone home: the build machines have no internet.
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1
# Every command a target runs, and every stage command DVC starts (`python -m stages...`), finds
# the project's venv first on PATH, as if it were activated: no `source .venv/bin/activate` needed.
SYSTEM_PATH := $(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup python-check test lint demo repro exp compare mlflow-ui bench fuzz mutate rehearsal clean serve predict batch docker-test \
	deploy invoke status undeploy

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^## / {printf "\n%s\n", substr($$0, 4)} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

## Set-up and tests
setup: $(VENV)/.installed ## create .venv with the pinned stack, install nginx, its njs module and envsubst if missing
	@missing="$$(command -v nginx >/dev/null || echo nginx) $$(command -v envsubst >/dev/null || echo gettext-base)"; \
	missing="$$missing $$([ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || echo libnginx-mod-http-js)"; \
	if [ -n "$$(echo $$missing)" ]; then echo "installing$$missing (apt)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	@echo "setup done: $(VENV) ready, nginx $$(nginx -v 2>&1 | cut -d/ -f2), $$(command -v envsubst)"

$(VENV)/.installed: requirements.txt requirements-dev.txt | python-check
	PATH="$(SYSTEM_PATH)" $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

# The download stage and the rehearsal extract archives with tarfile's extraction filters (Python 3.11.4 on;
# Debian 12's python3 is 3.11.2): refused before .venv is made, not at the first download.
python-check:
	@PATH="$(SYSTEM_PATH)" $(PYTHON_SYSTEM) -c 'import tarfile; tarfile.data_filter' 2>/dev/null || { \
	  echo "make setup: $(PYTHON_SYSTEM) ($$(PATH="$(SYSTEM_PATH)" $(PYTHON_SYSTEM) -V 2>&1)) has no tarfile extraction" \
	    "filters; the project needs Python 3.11.4 or newer: make setup PYTHON_SYSTEM=/path/to/python3.12" >&2; exit 2; }

test: lint ## lint, then run the whole test suite (offline; TEST_WORKERS=2 processes)
	TF_NUM_INTRAOP_THREADS=$(TEST_TF_THREADS) \
	  $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

lint: ## ruff on the code, shellcheck on the scripts, hadolint on the Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck serving/*.sh
	$(VENV)/bin/hadolint serving/Dockerfile

fuzz: ## the fuzz test with many more cases than make test runs (HYPOTHESIS_PROFILE=fuzz; runs make demo first, minutes)
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -s -p no:cacheprovider tests/test_fuzz.py

mutate: ## mutation testing: mutmut over the pure-Python core (score per module, mutants let through), then the named mutants (long; not in make test)
	$(VENV)/bin/mutmut run --max-children $(TEST_WORKERS)
	$(PYTHON) -m harness.mutation_score
	$(PYTHON) -m harness.named_mutants

## Pipeline
demo: ## the whole pipeline on the embedded sample with the tiny model, as a DVC experiment (CPU, minutes)
	$(DVC) exp run $(addprefix -S ,$(DEMO_PARAMS))
	@echo "demo done: metrics/eval.json, plots/, models/; params.yaml now holds the demo's values" \
	  "('git checkout params.yaml' returns to the real run)"

repro: ## dvc repro: the real run with params.yaml as it is
	$(DVC) repro

exp: ## SET='key=value ...' [NAME=...]: one DVC experiment with those params changed (dvc exp run -S ...)
	@test -n "$(SET)" || { echo "usage: make exp SET='train.learning_rate=0.004 model=retinanet_tiny' [NAME=lr-4e-3]"; exit 2; }
	$(DVC) exp run $(if $(NAME),-n $(NAME)) $(addprefix -S ,$(SET))

compare: ## the workspace and its experiments side by side: AP, AP50, AP75, parameters, train images/s, model, dataset, changed params
	@COLUMNS=$(COMPARE_WIDTH) $(DVC) exp show --no-pager --only-changed --sort-by AP50 --sort-order desc \
	  --keep '$(COMPARE_KEEP)' --drop '$(COMPARE_DROP)'

mlflow-ui: ## the MLflow UI on the same runs (http://127.0.0.1:$(MLFLOW_PORT), MLFLOW_PORT=...)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

bench: ## print the speed and memory benchmarks (figures and ratios against in-run baselines; the rehearsal too)
	$(PYTHON) -m benchmarks.tf_start
	$(PYTHON) -m benchmarks.tfrecord_throughput
	$(PYTHON) -m benchmarks.demo_pipeline
	$(PYTHON) -m benchmarks.train_loop
	$(PYTHON) -m benchmarks.input_per_core
	$(PYTHON) -m benchmarks.family_speed
	$(PYTHON) -m benchmarks.dfine_depthwise
	$(PYTHON) -m benchmarks.batch_inference
	$(PYTHON) -m benchmarks.serving_memory
	$(PYTHON) -m benchmarks.rehearsal

rehearsal: ## the default run (Pets, ResNet-50 preset, 800 px; MODEL=dfine_small: another model file) offline through every stage on stand-in data + preset, served; 4 steps (CPU, ~15 min)
	$(PYTHON) -m benchmarks.rehearsal $(if $(MODEL),--model $(MODEL))

## Serving (local)
serve: ## serve the newest export on 127.0.0.1:8080 (SERVE_PORT=...): the container's nginx + entrypoint, TF Serving stand-in
	MODEL_NAME=$(MODEL_NAME) MODEL_BASE_PATH=$(EXPORT_DIR) NGINX_LISTEN=127.0.0.1:$(SERVE_PORT) \
	  TFS_BIN="$(PYTHON) -m detkit.serve.tfserving" serving/entrypoint.sh

predict: ## IMAGE=<file> [URL=...]: send an image as a TF Serving REST request (docs/export.md), print and draw the detections
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=path/to/image.jpg [URL=$(URL)]"; exit 2; }
	$(PYTHON) -m detkit.serve.predict "$(IMAGE)" --url "$(URL)" --export "$(EXPORT_DIR)/$(MODEL_NAME)"

batch: ## INPUT=<folder|s3://...> OUTPUT=<folder|s3://...> [DRAW=1]: the newest export over every image, one JSON each + COCO files
	@test -n "$(INPUT)" && test -n "$(OUTPUT)" || { echo "usage: make batch INPUT=path/to/images OUTPUT=path/to/results [DRAW=1]" \
	  "(or INPUT=s3://bucket/in OUTPUT=s3://bucket/out: SageMaker Batch Transform)"; exit 2; }
	$(if $(filter s3://%,$(INPUT)),$(PYTHON) -m detkit.cloud.transform "$(INPUT)" "$(OUTPUT)" $(DEPLOY_OVERRIDES),\
	  $(PYTHON) -m detkit.serve.batch "$(INPUT)" "$(OUTPUT)" --export "$(EXPORT_DIR)/$(MODEL_NAME)" $(if $(DRAW),--draw))

## Deploy (AWS SageMaker; credentials from the usual AWS chain)
docker-test: ## build the serving image from build/serving and send it the REST request of docs/export.md (needs Docker)
	@if ! docker info >/dev/null 2>&1; then \
	  echo "docker-test: SKIPPED: no Docker engine here ('docker info' failed); the image was not built"; \
	else serving/docker-test.sh build/serving "$(MODEL_NAME)" "$(PYTHON)"; fi

deploy: ## [DEPLOY_IMAGE=aws] quality gate, image (ECR, or S3 + AWS's image), endpoint (blue/green update), alarms, autoscaling
	$(DEPLOY) deploy --context build/serving --archive build/model.tar.gz --metrics metrics/eval.json $(DEPLOY_OVERRIDES)

invoke: ## IMAGE=<file>: send an image to the endpoint with boto3 invoke_endpoint, print and draw
	@test -n "$(IMAGE)" || { echo "usage: make invoke IMAGE=path/to/image.jpg"; exit 2; }
	$(DEPLOY) invoke "$(IMAGE)" --export "$(EXPORT_DIR)/$(MODEL_NAME)" $(DEPLOY_OVERRIDES)

status: ## the endpoint's state, image, alarms and autoscaling, and this project's models and endpoint configs
	$(DEPLOY) status $(DEPLOY_OVERRIDES)

undeploy: ## delete the autoscaling, endpoint, alarms, endpoint configs and models this project created (stops billing)
	$(DEPLOY) undeploy $(DEPLOY_OVERRIDES)

## Housekeeping
clean: ## remove generated artefacts (not the download cache)
	rm -rf data/raw data/records metrics plots build models
