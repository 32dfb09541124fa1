# sparse_engine: `make test` and `make demo` set everything up on a fresh machine.
#
# Without an active virtual environment, a .venv is created here. Pinned versions are those the
# project is tested with; torch 2.11-2.13 and Triton 3.6-3.9 are supported.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
DEPS := triton==3.9.0 numpy==2.4.6 pybind11==3.1.0 pytest==9.2.0 tqdm==4.70.1 matplotlib==3.11.2 \
        ninja==1.13.2 setuptools==84.2.1 wheel \
        safetensors==0.8.0
# The sweep runner's dependencies: Ray (an optional extra for users, sparse_engine[ray]; its tests run
# on a local Ray instance) and tomli on Python 3.10 (tomllib from 3.11 on).
SWEEP_DEPS := ray==2.60.0 "tomli==2.5.0; python_version < '3.11'"
DATA_DIR ?=
DEMO_ARGS ?=
# make demo also runs its sweep the other way (stacked / one at a time) and reports both wall times
DEMO_STACKING ?= --compare-stacking
BENCH_ARGS ?=
PYTEST_ARGS ?=

ifdef VIRTUAL_ENV
PY := python
ENV_STAMP := $(VIRTUAL_ENV)/.sparse_engine-deps
else
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.sparse_engine-deps
endif
BUILD_STAMP := $(dir $(ENV_STAMP)).sparse_engine-build
SWEEP_STAMP := $(dir $(ENV_STAMP)).sparse_engine-sweep-deps
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test test-models demo demo-second-order bench aot-check gpu-check data clean

setup: $(BUILD_STAMP)

$(ENV_STAMP): Makefile
ifndef VIRTUAL_ENV
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
endif
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(SWEEP_STAMP): $(ENV_STAMP)
	$(PY) -m pip install -q $(SWEEP_DEPS)
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: setup $(SWEEP_STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(PY) -m pytest -q tests $(PYTEST_ARGS)

# The reference models end to end, with torch.compile and torch.export of each (several minutes on 2 cores).
test-models: setup
	SPARSE_ENGINE_SLOW_TESTS=1 $(PY) -m pytest -q tests/test_coverage.py $(PYTEST_ARGS)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; nothing is downloaded at run time.
data:
	@if [ -n "$(DATA_DIR)" ] || [ -n "$$SPARSE_ENGINE_DATA" ] \
	    || [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	    echo "Fashion-MNIST not found and apt is not available: put the IDX files in a directory and run"; \
	    echo "  make demo DATA_DIR=/path/to/fashion-mnist   (the demo's --data-dir option)"; exit 1; \
	fi

demo: setup data
	$(PY) -m sparse_engine.demo $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(DEMO_STACKING) $(DEMO_ARGS)

# One-shot magnitude, layer-wise OBS, CHITA and CHITA++ on a trained MLP 784-40-20-10 (about 4 minutes on 2 cores).
demo-second-order: setup data
	$(PY) -m sparse_engine.second_order_demo $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(DEMO_ARGS)

bench: setup
	$(PY) bench/bench_masked_linear.py $(BENCH_ARGS)
	$(PY) bench/bench_topk_mask.py $(BENCH_ARGS)
	$(PY) bench/bench_pruning_step.py $(BENCH_ARGS)
	$(PY) bench/bench_block_solve.py $(BENCH_ARGS)
	$(PY) bench/bench_sweep.py $(BENCH_ARGS)
	$(PY) bench/bench_dst.py $(BENCH_ARGS)
	$(PY) bench/bench_models.py $(BENCH_ARGS)

# Every Triton kernel, autotune config and dtype compiled for sm_90a and sm_80 without a GPU; fails on a
# compile error, a register spill or shared memory over the limit (kernels/aot.py; `make test` runs a
# subset). AOT_JOBS compiler processes.
AOT_JOBS ?= 2
aot-check: setup
	env -u TRITON_INTERPRET $(PY) -m sparse_engine.kernels.aot --jobs $(AOT_JOBS)

# On a lent GPU: build for sm_90a, pytest -m gpu, the benchmarks' quick modes and a quick demo, into
# one results folder (bench/gpu_check.py; under 8 minutes on an H100/H200). Without a GPU: skip mode.
gpu-check: setup
	$(PY) bench/gpu_check.py $(if $(DATA_DIR),--data-dir $(DATA_DIR))

clean:
	rm -rf build build-cmake *.egg-info sparse_engine/_C*.so $(BUILD_STAMP)
