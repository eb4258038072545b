# make demo: about five minutes: a small GPT-2 trained with Lightning, each checkpoint audited and gated as it
#            is saved (through `microscope up`), the pretrained MiniLM's SAE features, the digits CNN's
#            robustness (creates .venv if needed); make demo-full: the long audits (about 12 minutes)
# make test: the test suite in parallel, but for the slow end-to-end scenarios (marker `scenario`: deployments on
#            process pools, trainers through the webhook, the laptop stack, Postgres/Redis/S3); make test-all: all
#            of it, as CI runs it (both create .venv if needed and install chromium for the browser test)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# commands that only need Microscope importable: the clone's .venv when there is one, else the Python on
# PATH (an environment of your own), never a reinstall first
RUN_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
# tests wait on subprocesses and servers much of the time: 3 workers keep 2 cores busy
TEST_WORKERS ?= 3

.PHONY: install demo demo-full test test-all lint bench clean deploy image view up

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --workspace .microscope

demo-full: $(STAMP)
	$(BIN)/python examples/demo.py --workspace .microscope --full

PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(PYTEST) -m "not scenario"

test-all: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(PYTEST)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# make view: the results viewer on the demo's audits (http://127.0.0.1:8501)
view:
	$(RUN_PY) -m flows.cli view

# make up: Prefect, the audit deployment and the webhook receiver on this machine (docs/deploy.md, a laptop)
up:
	$(RUN_PY) -m flows.cli up

# make deploy: with PREFECT_API_URL set, create/update the work pools and register every deployment
#              (idempotent; DEPLOY_ARGS="--pool-type process" for a laptop's process pools)
deploy:
	$(RUN_PY) deployments/register.py $(DEPLOY_ARGS)

# make image: the CUDA and CPU images (docker/Dockerfile); not needed by deploy, which builds nothing
IMAGE    ?= microscope
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
image:
	docker buildx build -f docker/Dockerfile --target cuda -t $(IMAGE):cuda --build-arg REVISION=$(REVISION) --load .
	docker buildx build -f docker/Dockerfile --target cpu  -t $(IMAGE):cpu  --build-arg REVISION=$(REVISION) --load .

bench: $(STAMP)
	$(BIN)/python benchmarks/trace.py

clean:
	rm -rf .microscope
