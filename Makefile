# One entry point for people and CI. Every target creates .venv with the pinned versions
# (requirements-ci.txt) and builds the extension first, so each works on a fresh machine that has
# only python3 and pip (and, for the CUDA part, nvcc under $CUDA_HOME).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: help venv build test test-fast demo bench report clean device-venv device-build device-test device-check

help:
	@echo "make test   - create .venv, build the extension, run the test suite (what CI runs)"
	@echo "make demo   - run every op once per available backend and print shapes and timings"
	@echo "make bench  - pytest benchmarks/ --benchmark-only, then write benchmarks/RESULTS.md"
	@echo "make device-check - the GPU machine's versions (torch 2.11, triton 3.6): build + compile check + Triton tests"

$(BIN)/.installed: requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-ci.txt
	touch $@

venv: $(BIN)/.installed

# --no-build-isolation: the extension must be compiled against the torch in .venv.
$(BIN)/.built: $(BIN)/.installed $(SOURCES)
	mkdir -p build
	$(BIN)/python -m pip install -v -e . --no-build-isolation > build/build.log 2>&1 || (tail -50 build/build.log; exit 1)
	@grep -E "ptxas info *: (Used|Compiling)|spill" build/build.log | sort | uniq -c | sort -rn | head -8 || true
	touch $@

build: $(BIN)/.built

test: build
	$(BIN)/python -m pytest -q

demo: build
	$(BIN)/python benchmarks/demo.py

bench: build
	$(BIN)/python -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/out/bench.json -q
	$(BIN)/python benchmarks/report.py benchmarks/out/bench.json

# ------------------------------------------------------------------ the GPU machine's versions
# The device runs torch 2.11 + triton 3.6 on Python 3.12 (requirements-device.txt), not our pins.
# device-check builds the extension against that torch (CUDA for sm_90 only, as gpu_check.sh
# builds it, plus the CPU kernels) in a staged copy of the tree under build/device/src, so .venv
# and bus_kernels/_C*.so are untouched, then runs there the compile check (every Triton kernel
# at the mission shapes; targets from BUS_COMPILE_CCS, default 80 and 90, .ci/run: 90) and the
# kernel tests (Triton through its interpreter, the C++ CPU kernels built against torch 2.11).
DEVICE_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)) $(PYTHON))
DEVICE_VENV ?= .venv-device
DBIN := $(abspath $(DEVICE_VENV))/bin
DEVICE_DIR := build/device
DEVICE_TESTS ?= tests/test_triton_compile.py tests/test_kernels_relevance.py tests/test_kernels_select.py \
	tests/test_kernels_varlen_attention.py tests/test_backends.py tests/test_custom_ops.py tests/test_validation.py

$(DBIN)/.installed: requirements-device.txt
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DBIN)/python -m pip install -q -r requirements-device.txt
	touch $@

device-venv: $(DBIN)/.installed

# Always restaged (tests and kernels change); ninja's objects in $(DEVICE_DIR)/tmp survive, and tar
# keeps mtimes, so only changed sources recompile.
device-build: $(DBIN)/.installed
	rm -rf $(DEVICE_DIR)/src && mkdir -p $(DEVICE_DIR)/src
	tar -c --exclude=./build --exclude='./.venv*' --exclude=./.git --exclude='*.so' --exclude=__pycache__ \
		--exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./benchmarks/out . | tar -x -C $(DEVICE_DIR)/src
	cd $(DEVICE_DIR)/src && TORCH_CUDA_ARCH_LIST=9.0 $(DBIN)/python setup.py build_ext --inplace \
		--build-temp ../tmp > ../build.log 2>&1 || (tail -50 ../build.log; exit 1)
	@grep -E "ptxas info *: Used|spill" $(DEVICE_DIR)/build.log | sort | uniq -c | sort -rn | head -4 || true
	cd $(DEVICE_DIR)/src && $(DBIN)/python -c "import torch, triton, numpy, bus_kernels._ext as e; \
		print('device env: python', __import__('sys').version.split()[0], 'torch', torch.__version__, \
		'triton', triton.__version__, 'numpy', numpy.__version__); \
		assert e.compiled(), e.load_error(); \
		assert e.cuda_compiled() or not __import__('os').path.exists('$(CUDA_HOME)/bin/nvcc'), 'no CUDA kernels'"

# BUS_KERNELS_EXPECT_CUDA asks test_backends for sm_80 and sm_90 cubins; this build has sm_90 only
# (device-build asserts its CUDA kernels).
device-test:
	cd $(DEVICE_DIR)/src && env -u BUS_KERNELS_EXPECT_CUDA $(DBIN)/python -m pytest -q -p no:cacheprovider $(DEVICE_TESTS)

device-check: device-build
	$(MAKE) device-test

clean:
	rm -rf build dist *.egg-info bus_kernels/_C*.so $(BIN)/.built
