#!/usr/bin/env bash
# The whole GPU check in one device call (see ../shared/GPU.md): build the extension for sm_90,
# run the test suite on the GPU, run the benchmarks, write the report. Everything lands in $OUT
# (log.txt, bench.json, RESULTS.md) so that a timeout still returns the log.
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "== build"
  time python3 -m pip install -e . --no-build-isolation --no-deps --no-index -q 2>&1 | tail -3
  python3 -c "import bus_kernels as bk; print('backends', bk.available_backends())"
  echo "== tests on the GPU"
  timeout 240 python3 -m pytest tests -q -x -p no:cacheprovider
  echo "== benchmarks"
  timeout 300 python3 -m pytest benchmarks/ --benchmark-only --benchmark-json "$OUT/bench.json" -q -p no:cacheprovider
  python3 benchmarks/report.py "$OUT/bench.json" --out "$OUT/RESULTS.md" && cat "$OUT/RESULTS.md"
} 2>&1 | tee "$OUT/log.txt"
