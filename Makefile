# make demo: a full audit of the pretrained MiniLM on Python's help text, then of a small CNN trained on
#            scikit-learn's digits (creates .venv if needed)
# make test: the whole test suite (creates .venv if needed; installs chromium for the browser test when root)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := .microscope/demo

.PHONY: install demo test lint bench clean deploy image view

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/python examples/make_demo_corpus.py $(DEMO)/corpus.txt --print-model-path > $(DEMO).model
	$(BIN)/microscope run --model "$$(cat $(DEMO).model)" --dataset $(DEMO)/corpus.txt --config examples/demo.yaml
	$(BIN)/python examples/train_digits_cnn.py $(DEMO)/digits
	$(BIN)/microscope run --model $(DEMO)/digits/digits_cnn.safetensors --dataset $(DEMO)/digits/digits_test.npz \
		--config examples/demo_digits.yaml

test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# make view: the results viewer on the demo's audits (http://127.0.0.1:8501)
view: $(STAMP)
	$(BIN)/microscope view

# make deploy: with PREFECT_API_URL set, create/update the work pools and register every deployment
#              (idempotent; DEPLOY_ARGS="--pool-type process" for a laptop's process pools)
deploy: $(STAMP)
	$(BIN)/python deployments/register.py $(DEPLOY_ARGS)

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
