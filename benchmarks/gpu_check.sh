#!/usr/bin/env bash
# One script for the lent GPU machine (torch with CUDA already installed, nvcc,
# no network): build the extension against that torch, run the CUDA tests and
# the CUDA benchmark, write results under $OUT (default build/gpu_check).
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; < 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== build" | tee "$OUT/build.log"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
if ! "$PY" setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (tail):"; tail -n 60 "$OUT/build.log"; exit 1
fi
echo "build took $(( $(date +%s) - start ))s" | tee -a "$OUT/build.log"
export PYTHONPATH="$PWD/python:${PYTHONPATH:-}"

echo "== CUDA tests"
timeout 240 "$PY" -m pytest tests/python/test_ops_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.txt" | tail -n 25
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
timeout 200 "$PY" benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt" | tail -n 60
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$OUT/summary.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
