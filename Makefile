# Multimodal LLM serving on Triton. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD ?= build
SPEC ?= build_engines/specs/tiny.toml
PROFILE ?= cpu
# Spec values are read by mmtriton/spec.py (python -m build_engines.spec_value: any TOML spacing or quoting, and
# the spec's defaults for keys it leaves out), with the venv's Python once make setup made it, else PYTHON (>= 3.11).
SPEC_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
spec_value = $(shell $(SPEC_PY) -m build_engines.spec_value --spec $(1) $(2))
SPEC_NAME := $(call spec_value,$(SPEC),name)
BUNDLE := $(BUILD)/bundles/$(SPEC_NAME)
REPO ?= $(BUILD)/repo-$(PROFILE)-$(SPEC_NAME)
SAMPLES := $(BUILD)/samples
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?= 9000
AIPERF := $(BUILD)/aiperf-venv/bin/aiperf
PYTEST_ARGS ?=
PROMPT ?= Describe the picture and answer the question in the recording.
BENCH_ARGS ?= --concurrency 1,4,16 --requests 64 --input-tokens 96 --input-spread 16 --output-tokens 32 \
	--image-share 0.25 --audio-share 0.25 --warmup 4

.PHONY: help setup build-engines samples serve embed chat demo openai aiperf-setup aiperf test bench bench-url clean gpu-plan gpu-image gpu-engines gpu-up gpu-vllm-image gpu-vllm-up monitoring-up openai-image check-deploy

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-15s %s\n", $$1, $$2}'
	@echo "Variables: SPEC=$(SPEC) PROFILE=$(PROFILE) REPO=$(REPO) BUILD=$(BUILD)"

setup: $(VENV)/.installed ## create .venv and install the pinned dependencies (Triton server included)

# Refuse an interpreter outside requires-python in pyproject.toml (>=3.11: tomllib; the upper bound: the
# pinned wheels and the python backend stubs nvidia-pytriton ships). The bounds are read from pyproject.toml.
$(VENV)/.installed: requirements.txt
	@bounds=$$(sed -n 's/^requires-python = ">=3\.\([0-9][0-9]*\),<3\.\([0-9][0-9]*\)"$$/\1 \2/p' pyproject.toml); \
	[ -n "$$bounds" ] || { echo "error: cannot read requires-python (>=3.X,<3.Y) from pyproject.toml" >&2; exit 1; }; \
	set -- $$bounds; low=$$1; high=$$2; \
	ver=$$($(PYTHON) -c 'import sys; print("%d %d" % sys.version_info[:2])' 2>/dev/null) || \
		{ echo "error: cannot run PYTHON=$(PYTHON); give one, e.g. make setup PYTHON=python3.$$low" >&2; exit 1; }; \
	set -- $$ver; \
	if [ "$$1" -ne 3 ] || [ "$$2" -lt "$$low" ] || [ "$$2" -ge "$$high" ]; then \
		echo "error: PYTHON=$(PYTHON) is Python $$1.$$2, but this project needs Python >=3.$$low,<3.$$high" \
			"(pyproject.toml requires-python); run e.g. make setup PYTHON=python3.$$low" >&2; exit 1; \
	fi
	@echo "setup: [1/3] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "setup: [2/3] upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "setup: [3/3] installing the pinned wheels of requirements.txt (torch, transformers, Triton, DALI and" \
		"their dependencies: about 2 minutes on a fresh machine), one line per package ..."
	@set -o pipefail; start=$$SECONDS; \
	$(PY) -m pip install --progress-bar off -r requirements.txt | sed -u -n \
		-e 's/^Collecting \([^ ]*\).*/  \1/p' -e 's/^Processing .*\/\([^/-]*\)-\([^/-]*\)-[^/]*\.whl.*/  \1==\2/p' \
		-e 's/^Installing collected packages:.*/  installing the collected packages .../p'; \
	echo "setup: done in $$((SECONDS - start)) s"
	touch $@

build-engines: setup ## build the bundle for SPEC and render the PROFILE repository into $(REPO)
	$(PY) -m build_engines all --spec $(SPEC) --profile $(PROFILE) --build-dir $(BUILD)

samples: setup ## write a sample image and audio clip into build/samples
	$(PY) -m mmtriton.media.samples $(SAMPLES)

serve: build-engines ## run tritonserver on $(REPO) in the foreground (HTTP 8000, gRPC 8001, metrics 8002)
	$(PY) -m mmtriton.server --model-repository $(REPO) --work-dir $(BUILD)/server \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

embed: samples ## send the sample image and audio to a running server (make serve) and print the embeddings
	$(PY) -m clients.embed --url localhost:$(GRPC_PORT) --image $(SAMPLES)/sample.jpg --audio $(SAMPLES)/sample.wav

chat: samples ## stream an answer from a running server (make serve) for the sample image and audio
	$(PY) -m clients chat --url localhost:$(GRPC_PORT) --image $(SAMPLES)/sample.jpg --audio $(SAMPLES)/sample.wav "$(PROMPT)"

demo: build-engines samples ## set up, build, start the server, stream one image+audio+text answer, stop
	$(PY) -m tools.demo --repo $(REPO) --image $(SAMPLES)/sample.jpg --audio $(SAMPLES)/sample.wav

bench: build-engines ## before/after benchmark on CPU: engine batch 1 vs in-flight batching; report under results/
	$(PY) -m build_engines render --bundle $(BUNDLE) --profile $(PROFILE) --out $(REPO)-bs1 --set serving.max_batch_size=1
	$(PY) -m bench --start-cpu-server --compare $(REPO)-bs1 $(REPO) $(BENCH_ARGS)

bench-url: ## benchmark a running server (make serve, or a GPU host: add --copy-bandwidth-gbs to BENCH_ARGS)
	$(PY) -m bench --url localhost:$(GRPC_PORT) --metrics-url http://localhost:$(METRICS_PORT)/metrics $(BENCH_ARGS)

openai: setup ## OpenAI-compatible front door on OPENAI_PORT (9000) against a running server (make serve)
	$(PY) -m openai_frontend --triton-url localhost:$(GRPC_PORT) --bundle $(BUNDLE) --port $(OPENAI_PORT)

# aiperf pins numpy 2 and protobuf 7, so it gets a virtualenv of its own (tests/test_openai_aiperf.py uses it).
$(AIPERF): requirements-aiperf.txt
	$(PYTHON) -m venv $(BUILD)/aiperf-venv
	$(BUILD)/aiperf-venv/bin/pip install --quiet -r requirements-aiperf.txt
	touch $@

aiperf-setup: $(AIPERF) ## install aiperf into build/aiperf-venv

aiperf: aiperf-setup ## aiperf against the front door (make serve + make openai): streamed chat, base64 JPEGs
	$(AIPERF) profile --model $(SPEC_NAME) --url http://localhost:$(OPENAI_PORT) --endpoint-type chat --streaming \
		--tokenizer $(BUNDLE)/llm --synthetic-input-tokens-mean 32 --output-tokens-mean 16 --extra-inputs ignore_eos:true \
		--image-batch-size 1 --image-width-mean 320 --image-height-mean 240 --image-format jpeg \
		--request-count 64 --concurrency 8 --use-server-token-count --ui none --artifact-dir $(BUILD)/aiperf

test: build-engines aiperf-setup ## run the test suite (starts its own tritonserver on free ports)
	MMTRITON_REQUIRE_AIPERF=1 $(PY) -m pytest tests $(PYTEST_ARGS)

# gpu-* targets: SPEC when given (command line or environment), else the GPU smoke spec. tiny.toml
# (the cpu default) has head size 16, which the TensorRT-LLM attention plugin cannot build.
GPU_SPEC := $(if $(filter file,$(origin SPEC)),build_engines/specs/tiny-gpu.toml,$(SPEC))
GPU_SPEC_NAME := $(call spec_value,$(GPU_SPEC),name)
GPU_BUNDLE := $(BUILD)/bundles/$(GPU_SPEC_NAME)

gpu-plan: setup ## print the TP=2 GPU build plan (convert, trtllm-build, trtexec) for SPEC (default tiny-gpu) without running it
	$(PY) -m build_engines bundle --spec $(GPU_SPEC) --out $(GPU_BUNDLE)
	$(PY) -m build_engines.trtllm_build --spec $(GPU_SPEC) --bundle $(GPU_BUNDLE) --out $(BUILD)/engines/$(GPU_SPEC_NAME) --dry-run

gpu-image: ## GPU host: build the serving image (Triton 26.07 trtllm + DALI backend)
	docker compose build

gpu-engines: setup ## GPU host: build the bundle (host), then engines, encoder plan and the gpu repository in the container
	$(PY) -m build_engines bundle --spec $(GPU_SPEC) --out $(GPU_BUNDLE)
	SPEC=$(GPU_SPEC) SPEC_NAME=$(GPU_SPEC_NAME) docker compose --profile build run --rm build-engines

gpu-up: ## GPU host: serve with TP=2 (mpirun leader mode) on ports 8000/8001/8002
	SPEC_NAME=$(GPU_SPEC_NAME) docker compose up -d triton

# gpu-vllm: GPUs reserved = the spec's [serving] tensor_parallel_size (mmtriton/spec.py's default when it leaves it out).
GPU_VLLM_TP := $(call spec_value,$(GPU_SPEC),serving.tensor_parallel_size)

# A spec that cannot be read (the message is above) stops every target that names the spec's folders.
SPEC_FREE_GOALS := help setup clean check-deploy samples embed chat bench-url aiperf-setup gpu-image gpu-vllm-image \
	openai-image monitoring-up
ifneq ($(filter-out $(SPEC_FREE_GOALS),$(or $(MAKECMDGOALS),help)),)
ifeq ($(and $(SPEC_NAME),$(GPU_SPEC_NAME),$(GPU_VLLM_TP)),)
$(error cannot read the spec SPEC=$(SPEC) (or $(GPU_SPEC)) with $(SPEC_PY): it needs Python >= 3.11 (make setup PYTHON=python3.11) and a valid spec)
endif
endif

gpu-vllm-image: ## GPU host: build the vLLM serving image (Dockerfile.vllm: Triton 25.11 + vLLM 0.26.0 + DALI backend)
	docker compose --profile vllm build triton-vllm

gpu-vllm-up: setup ## GPU host: bundle (host), render the gpu-vllm repository and serve it on tensor_parallel_size GPUs
	$(PY) -m build_engines bundle --spec $(GPU_SPEC) --out $(GPU_BUNDLE)
	SPEC_NAME=$(GPU_SPEC_NAME) VLLM_GPUS=$(GPU_VLLM_TP) docker compose --profile vllm up -d triton-vllm

monitoring-up: ## GPU host: Prometheus (:9090) and Grafana (:3000) with the Triton dashboard
	docker compose --profile monitoring up -d

openai-image: ## build the OpenAI front door's image (Dockerfile.openai)
	docker compose build openai

check-deploy: ## validate docker-compose.yml and monitoring/prometheus.yml with the real tools
	docker-compose config -q && promtool check config monitoring/prometheus.yml

clean: ## remove build outputs (keeps .venv)
	rm -rf $(BUILD)
