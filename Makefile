# The README's commands. Each target is self-sufficient on a fresh machine:
#   make demo   the main job (installs what it needs, builds, runs)
#   make test   the test suite (same install path)
#   make build  install the project in editable mode and build iddpm_ext._C
#   make bench  kernel microbenchmarks on this machine's default device
# Without PYTHON=..., a virtual environment .venv is created with torch and the tools;
# with PYTHON=/path/to/python that interpreter (and its torch) is used as it is.
# Re-runs are incremental: nothing is reinstalled or rebuilt unless a source changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?=
VENV ?= .venv
BOOTSTRAP_PYTHON ?= python3
# The CUDA build of torch, so that CUDA sources compile (and run where a GPU exists).
TORCH_SPEC ?= torch==2.14.1
BUILD_DEPS := scikit-build-core pybind11 ninja "cmake>=3.26" numpy
RUN_DEPS := tqdm pillow safetensors
# The digits demo's data set (scikit-learn ships it; no download): pyproject's [digits] extra.
DEMO_DEPS := "scikit-learn>=1.2"
TEST_DEPS := pytest hypothesis

ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.iddpm-deps
else
PY := $(PYTHON)
DEPS_STAMP := build/.iddpm-deps-external
endif

# A CUDA toolkit in the standard place is used unless CUDA_HOME says otherwise.
ifeq ($(origin CUDA_HOME), undefined)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

SOURCES := $(shell find csrc python cmake -type f 2>/dev/null) CMakeLists.txt pyproject.toml
BUILD_STAMP := build/.iddpm-installed

.PHONY: help deps build test demo bench gpu-check clean

help:
	@echo "make demo   - the main job: a short end-to-end run (installs and builds first)"
	@echo "make test   - the test suite (installs and builds first)"
	@echo "make build  - install the project (editable) and build iddpm_ext._C"
	@echo "make bench  - kernel microbenchmarks"
	@echo "Variables: PYTHON=/path/to/python (skip .venv), TORCH_SPEC, IDDPM_EXT_CUDA=0|1, TORCH_CUDA_ARCH_LIST"

deps: $(DEPS_STAMP)

$(VENV)/.iddpm-deps: pyproject.toml Makefile Makefile
	@test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check "$(TORCH_SPEC)" $(BUILD_DEPS) $(RUN_DEPS) $(DEMO_DEPS) $(TEST_DEPS)
	@touch $@

build/.iddpm-deps-external: pyproject.toml Makefile Makefile
	@mkdir -p build
	@$(PY) -c "import torch, numpy, pybind11, scikit_build_core, ninja, pytest, hypothesis, tqdm, PIL, safetensors, sklearn" 2>/dev/null \
	  || $(PY) -m pip install --disable-pip-version-check $(BUILD_DEPS) $(RUN_DEPS) $(DEMO_DEPS) $(TEST_DEPS)
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

demo: $(BUILD_STAMP)
	$(PY) -m iddpm_ext demo

bench: $(BUILD_STAMP)
	$(PY) -m iddpm_ext bench all

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build iddpm_ext/_C*.so
