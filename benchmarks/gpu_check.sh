#!/usr/bin/env bash
# One script for the lent GPU machine (torch with CUDA already installed, nvcc,
# no network): build the extension against that torch, run the CUDA tests, the
# CUDA benchmark (issue 3's bar), compute-sanitizer on a test subset and Nsight
# Compute counters of the bar cases; results under $OUT (default build/gpu_check),
# at most 9 files.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; < 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  nvcc --version | tail -n 2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== build (MAX_JOBS=${MAX_JOBS:-16})" | tee "$OUT/build.log"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
rm -rf build/temp.* python/qwix_torch/_C*.so  # never reuse objects built for another torch
if ! "$PY" setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (tail):"; tail -n 80 "$OUT/build.log"; exit 1
fi
echo "build took $(( $(date +%s) - t0 ))s" | tee -a "$OUT/build.log"
export PYTHONPATH="$PWD/python:${PYTHONPATH:-}"

echo "== CUDA tests"
timeout 180 "$PY" -m pytest tests/python/test_ops_cuda.py tests/python/test_bench_cuda.py -q -rf --tb=short \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.txt" | tail -n 40
tests_rc=${PIPESTATUS[0]}
echo "tests done at $(( $(date +%s) - t0 ))s"

echo "== benchmark"
timeout 330 "$PY" benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json" 2>&1 \
  | tee "$OUT/bench_cuda.txt" | tail -n 140
bench_rc=${PIPESTATUS[0]}
echo "bench done at $(( $(date +%s) - t0 ))s"

echo "== compute-sanitizer memcheck (subset)"
san_rc=skipped
if command -v compute-sanitizer > /dev/null; then
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/python/test_ops_cuda.py -q \
    -p no:cacheprovider -k "half_types or unaligned or backward or int8-absmax" -x 2>&1 \
    | tee "$OUT/sanitizer.txt" | tail -n 15
  san_rc=${PIPESTATUS[0]}
fi
echo "== Nsight Compute (bar cases, one launch each)"
ncu_rc=skipped
if command -v ncu > /dev/null; then
  timeout 120 ncu --csv --kernel-name regex:fused_rows --metrics gpu__time_duration.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__inst_executed.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    "$PY" benchmarks/ncu_probe.py > "$OUT/ncu.csv" 2>&1
  ncu_rc=$?
  grep -E "launch:|dram__|sm__throughput|inst_executed" "$OUT/ncu.csv" | cut -c1-200 | head -n 50
fi
echo "tests rc=$tests_rc bench rc=$bench_rc sanitizer rc=$san_rc ncu rc=$ncu_rc total $(( $(date +%s) - t0 ))s" \
  | tee "$OUT/summary.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
