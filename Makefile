# Keel. A newcomer needs two commands (see README.md):
#   make serve   set up, make the data set, train, export, and serve on http://127.0.0.1:3000
#   make test    set up, then run the test suite (this is what CI runs)
# Every step reuses what already exists, so later runs start in seconds.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.keel-installed
REQUIREMENTS := requirements/serve.txt requirements/train.txt requirements/dev.txt requirements/ray.txt \
	requirements/constraints.txt

DATA ?= data/shapes
RUN ?= runs/quickstart
MODEL ?= artifacts/model.onnx
MODEL_NAME ?= keel-classifier
ARCH ?= alexnet_bn
# The quick start trains the architecture's recipe: for alexnet_bn a quarter-width AlexNet-BN without
# dropout at 96 px (the shapes data set is small), a few minutes on a 2-core laptop. Accuracy and timing: README.md.
RECIPE ?= training/recipes/$(ARCH).yaml
TRAIN_ARGS ?= --recipe $(RECIPE)
HOST ?= 127.0.0.1
PORT ?= 3000
SAMPLE_IMAGE := $(DATA)/test/star/00000.png
# The BentoML model store and built Bentos live inside the clone, not in ~/bentoml.
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup data train model serve test bento bench lock clean container-tools container container-run doctor \
	gpu-check lb-tools

setup: $(STAMP)

# Keel itself is installed editable, for its commands (keel-train, keel-export, keel-batch, keel-doctor).
$(STAMP): $(REQUIREMENTS) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/serve.txt -r requirements/train.txt -r requirements/dev.txt -r requirements/ray.txt \
		-c requirements/constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

data: $(DATA)/dataset.json
$(DATA)/dataset.json: | $(STAMP)
	$(PY) -m training.shapes --out $(DATA)

train: $(RUN)/best.pt
$(RUN)/best.pt: | $(DATA)/dataset.json
	$(PY) -m training --arch $(ARCH) --data $(DATA) --out $(RUN) $(TRAIN_ARGS)

model: $(MODEL)
$(MODEL): | $(RUN)/best.pt
	$(PY) -m export $(RUN)/best.pt --out $(MODEL) --name $(MODEL_NAME)

serve: $(MODEL)
	@KEEL_MODEL=$(MODEL) $(BIN)/bentoml serve service.service:Classifier --host $(HOST) --port $(PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' INT TERM EXIT; \
	until curl -sf http://$(HOST):$(PORT)/readyz >/dev/null; do \
		kill -0 $$server 2>/dev/null || exit 1; sleep 0.5; \
	done; \
	echo; echo "Keel is serving $(MODEL) on http://$(HOST):$(PORT). Try:"; \
	echo "  curl -F image=@$(SAMPLE_IMAGE) http://$(HOST):$(PORT)/classify"; echo; \
	wait $$server

# container-tools first: on a clean machine as root it installs podman, so the container test runs.
# ruff first: a lint error fails the run before the suite starts (configuration in pyproject.toml).
test: $(STAMP) container-tools lb-tools
	$(BIN)/ruff check .
	$(PY) -m pytest

# A Bento (service code + the model from the store), the input to `bentoml containerize`.
bento: $(MODEL)
	$(PY) -m export $(RUN)/best.pt --out $(MODEL) --name $(MODEL_NAME) --bentoml $(MODEL_NAME)
	$(BIN)/bentoml build

# The container image from that Bento, built with podman from a local base image (no registry), and
# run: docs/deployment.md. container-tools installs podman, runc and debootstrap when missing (as root).
IMAGE ?= keel:latest
CONTAINER_ARGS ?=
# CUDA=0: a CPU-only image, without the 2.2 GB of CUDA/cuDNN wheels (use another IMAGE tag)
CUDA ?= 1
container-tools:
	@deploy/container-tools.sh

# haproxy, the load balancer of the two-replica benchmark and test (benchmarks/replicas.py)
lb-tools:
	@deploy/lb-tools.sh

container: bento container-tools
	KEEL_CUDA=$(CUDA) BENTOML=$(BIN)/bentoml deploy/build-image.sh keel:latest $(IMAGE)

# CONTAINER_ARGS: more `podman run` options, e.g. -e KEEL_TOP_K=3, or --device nvidia.com/gpu=all
container-run:
	CONTAINERS_CONF=$${CONTAINERS_CONF:-deploy/containers.conf} podman run --rm --init -p $(HOST):$(PORT):3000 \
		$(CONTAINER_ARGS) $(IMAGE)

# Every benchmark, then docs/benchmarks.md (benchmarks/__main__.py), on $(DATA) and the benchmarks' own
# 64 px model (made once into artifacts/bench/), not the quick start's: the published numbers stay comparable
# when the quick-start recipe changes. Take it on a quiet machine: about 30 minutes.
# QUICK=1: a smoke run of a few seconds per module into build/bench-quick/, leaving docs/ alone.
bench: $(STAMP) lb-tools
	$(PY) -m benchmarks --data $(DATA) $(if $(QUICK),--quick)

# What really runs where (service/doctor.py): onnxruntime's build and providers, the GPU, the CUDA/cuDNN
# libraries and their files, and the provider a session on $(MODEL) (when it exists; KEEL_MODEL and
# KEEL_MODELS win) really gets, with its speed. DOCTOR_ARGS="--json", "--device cuda", ...
doctor: $(STAMP)
	$(if $(wildcard $(MODEL)),KEEL_MODEL=$${KEEL_MODEL:-$(MODEL)}) $(PY) -m service.doctor $(DOCTOR_ARGS)

# Keel's CUDA path end to end on one GPU (benchmarks/gpu_check.py): docs/gpu.md and docs/gpu.json, in under
# 8 minutes on an H100. No venv needed on the GPU host: GPU_PYTHON is a python3 with torch (CUDA) and the
# serving packages (source .gpu/bin/install.sh, see docs/gpu.md). DRY=1: the same stages on the CPU, tiny,
# into build/gpu-check-dry/. GPU_CHECK_ARGS: more options, e.g. "--budget 360" or "--only service".
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(if $(DRY),--dry-run) $(GPU_CHECK_ARGS)

# Refresh the pins of everything the direct requirements pull in (torch is pinned in train.txt).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude torch --exclude keel > requirements/constraints.txt

clean:
	rm -rf $(DATA) runs artifacts .bentoml
