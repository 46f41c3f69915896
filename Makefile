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

.PHONY: help venv build test test-fast demo bench report clean

help:
	@echo "make test   - create .venv, build the extension, run the test suite (what CI runs)"
	@echo "make demo   - run every op once per available backend and print shapes and timings"
	@echo "make bench  - pytest benchmarks/ --benchmark-only, then write benchmarks/RESULTS.md"

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

clean:
	rm -rf build dist *.egg-info bus_kernels/_C*.so $(BIN)/.built
