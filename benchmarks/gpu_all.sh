#!/usr/bin/env bash
# One GPU: every gpu-marked test and every GPU benchmark. From the repo root:
#     OUT=/tmp/gpu_out bash benchmarks/gpu_all.sh [tests|bench|all|precision]
# tests: the gpu-marked tests, then every example with --device cuda (about 6 minutes on an
# H200); bench: the GPU benchmarks (about 4 minutes); all (the default): both, in that order;
# precision: the mixed-precision GPU tests and benchmark rows alone.
# (with CuPy, torch, JAX and numba-cuda importable; on the device machine, NumPy < 2.5 first:
#  see docs/kernels.md, "Running on the GPU machine"). Logs go to $OUT/<step>.log; a failed
# step does not stop the next one; the exit code is the number of failed steps. Files that the
# benchmarks write (bench_scan's scan_bench_<gpu>.png) go to $OUT too.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
FAILED=0

step() {  # step NAME LIMIT_S command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s, at ${SECONDS} s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  echo "== $name: exit $rc"
  (( rc != 0 )) && FAILED=$((FAILED + 1))
  return 0
}

WHAT=${1:-all}
if [[ $WHAT == tests || $WHAT == all ]]; then
  step gpu_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rf --ignore=tests/test_examples.py
  step examples 360 python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/test_examples.py
fi
if [[ $WHAT == bench || $WHAT == all ]]; then
  step autograd 60 python3 benchmarks/bench_autograd.py --device cuda
  step scan 120 python3 benchmarks/bench_scan.py --out "$OUT"
  step moe 90 python3 benchmarks/bench_moe.py
  step train 120 python3 benchmarks/bench_train.py
  step decode 180 python3 benchmarks/bench_decode.py
  step train_precisions 120 python3 benchmarks/bench_train.py --precisions --steps 3
fi
if [[ $WHAT == precision ]]; then   # mixed precision alone (docs/precision.md): under 5 minutes
  step precision_tests 110 python3 -m pytest -q -p no:cacheprovider -m gpu -rf \
    tests/test_precision_kernels.py tests/test_kernels_scan_cuda.py
  step train_precisions 100 python3 benchmarks/bench_train.py --precisions --steps 3
  step scan 80 python3 benchmarks/bench_scan.py --skip-baselines
fi
echo "== done in ${SECONDS} s, ${FAILED} failed"
exit $FAILED
