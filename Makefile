# The README's commands. Each target is self-sufficient on a fresh machine:
#   make demo   the main job (installs what it needs, builds, runs)
#   make test   the test suite (same install path)
#   make lint   ruff (lint + format check) on the Python, clang-format on csrc/ and python/
#   make build  install the project in editable mode and build iddpm_ext._C
#   make bench  kernel microbenchmarks on this machine's default device
#   make format apply ruff format and clang-format in place
# Without PYTHON=..., a virtual environment .venv is created with torch and the tools;
# with PYTHON=/path/to/python that interpreter (and its torch) is used as it is.
# Re-runs are incremental: nothing is reinstalled or rebuilt unless a source changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?=
VENV ?= .venv
BOOTSTRAP_PYTHON ?= python3
# The CUDA build of torch, so that CUDA sources compile (where a GPU is visible, or with IDDPM_EXT_CUDA=1).
TORCH_SPEC ?= torch==2.14.1
BUILD_DEPS := scikit-build-core pybind11 ninja "cmake>=3.26" numpy
RUN_DEPS := tqdm pillow safetensors matplotlib
# The digits demo's data set (scikit-learn ships it; no download): pyproject's [digits] extra.
DEMO_DEPS := "scikit-learn>=1.2"
# diffusers: the optional bridge (pyproject's [diffusers] extra), installed so its tests run.
TEST_DEPS := pytest hypothesis pytest-xdist "diffusers>=0.42"
# Test processes (pytest-xdist; each runs torch with one thread): auto = one per CPU core.
TEST_WORKERS ?= auto
# The installer of .venv's packages: uv (installed into .venv with pip first; several times faster
# than pip for torch's 5.5 GB, same pip configuration), falling back to pip; INSTALLER=pip: pip only.
INSTALLER ?= uv
# Pinned: a formatter's output changes between versions.
LINT_DEPS := ruff==0.17.6 clang-format==19.1.7

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
# The list of Python modules: the editable install maps module names to files, so adding,
# moving or removing a module reinstalls (a few seconds; nothing is recompiled).
PY_MODULES := build/.iddpm-modules
$(shell mkdir -p build && find iddpm_ext -name '*.py' | LC_ALL=C sort > $(PY_MODULES).new \
  && (cmp -s $(PY_MODULES).new $(PY_MODULES) || mv $(PY_MODULES).new $(PY_MODULES)); rm -f $(PY_MODULES).new)
CXX_FILES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.inc' 'python/*.cpp' \
  'tests/*.cpp' 'tests/*.h' 2>/dev/null)
CLANG_FORMAT = $(PY) -c 'import clang_format; clang_format.clang_format()'

.PHONY: help deps build test lint format demo bench gpu-check clean

help:
	@echo "make demo   - the main job: a short end-to-end run (installs and builds first)"
	@echo "make test   - the test suite (installs and builds first)"
	@echo "make lint   - ruff check + ruff format --check + clang-format --dry-run (CI runs it)"
	@echo "make format - apply ruff format and clang-format"
	@echo "make build  - install the project (editable) and build iddpm_ext._C"
	@echo "make bench  - kernel microbenchmarks"
	@echo "Variables: PYTHON=/path/to/python (skip .venv), TORCH_SPEC, IDDPM_EXT_CUDA=0|1, TORCH_CUDA_ARCH_LIST,"
	@echo "           TEST_WORKERS=auto|N (pytest-xdist processes for make test; 0: in one process),"
	@echo "           INSTALLER=uv|pip (what installs .venv's packages; uv falls back to pip)"

deps: $(DEPS_STAMP)

$(VENV)/.iddpm-deps: pyproject.toml Makefile scripts/install_deps.py
	@test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	INSTALLER=$(INSTALLER) $(VENV)/bin/python scripts/install_deps.py $(VENV)/bin/python "$(TORCH_SPEC)" \
	  $(BUILD_DEPS) $(RUN_DEPS) $(DEMO_DEPS) $(TEST_DEPS) $(LINT_DEPS)
	@touch $@

build/.iddpm-deps-external: pyproject.toml Makefile
	@mkdir -p build
	@$(PY) -c "import torch, numpy, pybind11, scikit_build_core, ninja, pytest, hypothesis, xdist, tqdm, PIL, \
	  safetensors, matplotlib, sklearn, ruff, clang_format, diffusers" 2>/dev/null \
	  || $(PY) -m pip install --disable-pip-version-check $(BUILD_DEPS) $(RUN_DEPS) $(DEMO_DEPS) $(TEST_DEPS) \
	  $(LINT_DEPS)
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES) $(PY_MODULES)
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

# The package's bytecode is written once up front (as .venv's packages' is at install): the
# suite starts ~50 Python processes (CLI runs, torchrun ranks), and where PYTHONDONTWRITEBYTECODE
# is set each would compile iddpm_ext's sources again. Up-to-date files are skipped.
BYTECODE = $(PY) -m compileall -q -j 0 iddpm_ext tests/helpers >/dev/null

# --dist loadgroup: tests marked xdist_group("...") (those sharing an expensive module
# fixture) run on one worker; every other test is handed out on its own, a few at a time, so
# the slow tests (collected first, tests/conftest.py) spread over the workers.
test: $(BUILD_STAMP)
	@$(BYTECODE)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

lint: $(DEPS_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(CLANG_FORMAT) --dry-run -Werror $(CXX_FILES)

format: $(DEPS_STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(CLANG_FORMAT) -i $(CXX_FILES)

demo: $(BUILD_STAMP)
	@$(BYTECODE)
	$(PY) -m iddpm_ext demo

bench: $(BUILD_STAMP)
	$(PY) -m iddpm_ext bench all

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build iddpm_ext/_C*.so
