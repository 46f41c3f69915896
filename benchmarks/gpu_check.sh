#!/usr/bin/env bash
# The whole GPU check in one device call of at most 9 minutes (see ../shared/GPU.md), stages
# ordered by value, each under its own timeout (cut to the time left), going on after a failure,
# everything teed to $OUT/log.txt so that a timeout still returns the log:
#   1 build     the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16), timed; no
#               build isolation, no dependency install: it builds in place against the device's torch
#   2 tests     the test suite on the GPU (no TRITON_INTERPRET) under set_sync_debug_mode("warn"),
#               syncs counted per test module (benchmarks/gpu_pytest_syncs.py)
#   3 syncs     host syncs per op call, forward and backward, against issue 13's budgets
#   4 memcheck  compute-sanitizer --tool memcheck on every op and backend at small odd shapes
#   5 racecheck compute-sanitizer --tool racecheck, same subset
#   6 bench     kernels at the mission shapes (B=64, N=197/577, D=768, H=12, d=64, T=1/32, bf16):
#               GB/s and % of copy, TFLOP/s, vs padded SDPA and torch.nn.attention.varlen
#   7 e2e       the baseline/BUS train-step pair at batch 64 bf16, interleaved
#   8 compilecheck  the CPU compile check's kernels are the JIT's: same hashes, runtime n_regs/n_spills
#   then a summary table (benchmarks/gpu_bench.py summary), printed last.
# Usage, from the repo root:
#   bash benchmarks/gpu_check.sh             # on the device machine (run timeout_s about 560)
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the plan, tools, imports, scripts parse
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-525}"  # 9 min less the summary and the transfer back
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 OUT
unset TRITON_INTERPRET
START=$(date +%s)
: > "$OUT/stages.tsv"
FAILED=0

# stage NAME SECONDS CMD...: runs CMD under `timeout` (SECONDS, or the time left if less), records
# name/status/seconds in $OUT/stages.tsv and never stops the script.
stage() {
  local name=$1 budget=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((budget > left)) && budget=$left
  echo "== $name (timeout ${budget}s): $*"
  if ((DRY)); then
    local cmd="$*"
    printf '%s\tplanned\t%s\t%s\n' "$name" "$budget" "${cmd//$'\n'/ }" >>"$OUT/stages.tsv"
    return 0
  fi
  if ((budget < 10)); then
    echo "== $name: skipped, out of time"
    printf '%s\tskipped\t0\tout of time\n' "$name" >>"$OUT/stages.tsv"
    return 0
  fi
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@"
  rc=$?
  status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status="fail:$rc"; fi
  ((rc != 0)) && FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "" >>"$OUT/stages.tsv"
  echo "== $name: $status in $(($(date +%s) - t0)) s"
}

# compute-sanitizer sees the allocator's blocks, not tensors: without the caching allocator an
# out-of-bounds access leaves its allocation and is caught.
SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 3 --target-processes all
  --print-limit 20)

SCRIPTS=(benchmarks/gpu_bench.py benchmarks/gpu_pytest_syncs.py tests/triton_compile_check.py benchmarks/test_bench_e2e.py benchmarks/conftest.py setup.py)

# What the run needs, checked first (and all that --dry-run checks besides the plan).
preflight() {
  local bad=0 t
  echo "== environment"
  for t in "$PY" nvcc compute-sanitizer ncu cuobjdump nvidia-smi ninja timeout tee; do
    if command -v "$t" >/dev/null 2>&1; then echo "   tool $t: $(command -v "$t")"; else echo "   tool $t: MISSING"; fi
  done
  "$PY" - <<'EOF' || bad=1
import importlib, importlib.metadata as md, importlib.util, sys
print("   python", sys.version.split()[0])
for name, dist in (("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("pytest", "pytest"),
                   ("pytest_benchmark", "pytest-benchmark"), ("hypothesis", "hypothesis"), ("timm", "timm"),
                   ("transformers", "transformers")):
    # found and versioned without importing (transformers alone takes seconds); missing is
    # reported, not fatal: the stage that needs it fails and says so
    if importlib.util.find_spec(name) is None:
        print(f"   import {name}: MISSING")
        continue
    try:
        print(f"   import {name}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"   import {name}: found (no version)")
import torch
print("   cuda:", torch.version.cuda, "gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("bus_kernels", "bus"):  # the project itself must import (without its extension too)
    importlib.import_module(name)
    print(f"   import {name}: ok")
EOF
  for t in "${SCRIPTS[@]}"; do
    if [ ! -f "$t" ]; then echo "   script $t: MISSING"; bad=1; continue; fi
    "$PY" -c "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])" "$t" && echo "   script $t: parses" || bad=1
  done
  bash -n "$0" && echo "   script $0: parses" || bad=1
  "$PY" benchmarks/gpu_bench.py plan || bad=1
  return $bad
}

{
  echo "gpu_check $(date -u '+%F %T UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') dry-run=$DRY budget ${BUDGET_S}s"
  preflight
  PREFLIGHT=$?
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  # ptxas -v output (registers/spills of the CUDA kernels) goes to build.log; its summary to the log.
  stage build 110 bash -c "$PY setup.py build_ext --inplace > '$OUT/build.log' 2>&1; rc=\$?; tail -3 '$OUT/build.log'; grep -E 'ptxas info *: Used|spill' '$OUT/build.log' | sort | uniq -c | sort -rn | head -6; exit \$rc"
  # The CPU-only checks stay in CI: the compile check (stage compilecheck verifies it against the
  # JIT here), the dry run of this script and the CUDA host emulator (the real kernels run here).
  stage tests 130 "$PY" -m pytest tests -q -p no:cacheprovider -p benchmarks.gpu_pytest_syncs --maxfail=30 -W default \
    -m "not slow" --ignore=tests/test_triton_compile.py --ignore=tests/test_gpu_check.py \
    --ignore=tests/test_cuda_emulated.py
  stage syncs 30 "$PY" benchmarks/gpu_bench.py syncs --out "$OUT"
  stage memcheck 40 "${SANITIZE[@]}" --tool memcheck "$PY" benchmarks/gpu_bench.py sanitize
  stage racecheck 40 "${SANITIZE[@]}" --tool racecheck "$PY" benchmarks/gpu_bench.py sanitize
  stage bench 90 "$PY" benchmarks/gpu_bench.py bench --out "$OUT"
  stage e2e 50 "$PY" -m pytest benchmarks/test_bench_e2e.py -k interleaved --benchmark-only \
    --benchmark-json "$OUT/e2e.json" -q -p no:cacheprovider
  stage compilecheck 35 "$PY" tests/triton_compile_check.py --verify-runtime \
    --only relevance-bf16-N577-d64-T1 relevance-bf16-N577-d64-T32 varlen-bf16-N577-d64 select-bf16-N577
  "$PY" benchmarks/gpu_bench.py summary --out "$OUT"
  echo "gpu_check: $(($(date +%s) - START)) s, preflight $([ "$PREFLIGHT" = 0 ] && echo ok || echo FAILED)"
  if ((DRY)); then exit "$PREFLIGHT"; fi
  exit $((FAILED || PREFLIGHT))
} 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
