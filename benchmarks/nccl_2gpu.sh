#!/usr/bin/env bash
# Two GPUs of one host: the NCCL backend end to end, in under 420 s (2 x H200). From the repo root:
#     OUT=/tmp/x2_out bash benchmarks/nccl_2gpu.sh
# (with CuPy, torch and numba-cuda importable; on the device machine, NumPy < 2.5 first:
#  see docs/kernels.md, "Running on the GPU machine")
# 1. the NCCL selftest (launcher, 2 ranks; every check, ZeRO-1 and the single-buffer all-to-all included)
# 2. bench_alltoall gpu: tinymoe's single-buffer and list all-to-alls, raw CuPy NCCL (own and default
#    stream) and torch all_to_all_single side by side, host time per call, NCCL versions; EP split
#    -> $OUT/alltoall_gpu.{json,png}
# 3. the GPU tests (NCCL selftest, the single-buffer path on 2 GPUs, 2-GPU training == 1 CPU process)
# 4. 20 steps of examples/train_moe_gpt.py --expert-parallel --backend nccl                  -> $OUT/train_*
# (the bench runs second so that the measurement comes back even if a later step runs long)
# Every step runs under `timeout` (GNU timeout signals the whole process group: no orphaned ranks);
# a failed step does not stop the next one. Exit code: the number of failed steps.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/x2_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-405}          # seconds for the whole script
mkdir -p "$OUT"
FAILED=0
SUMMARY=""

TAIL=${TAIL:-30}
source "$(dirname "$0")/gpu_step.sh"   # step NAME LIMIT_S command...

step preflight 30 bash -c "nvidia-smi -L; $PY - <<'PY'
import importlib, sys
print('python', sys.version.split()[0])
for m in ('numpy', 'cupy', 'torch', 'safetensors', 'tqdm', 'matplotlib', 'numba', 'pytest'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'MISSING:', e)
import cupy
from cupy.cuda import nccl; print('GPUs', cupy.cuda.runtime.getDeviceCount(), 'NCCL', nccl.get_version())
PY"

step selftest 60 "$PY" -m tinymoe.distributed.launch --nproc 2 -m tinymoe.distributed.selftest --backend nccl

TAIL=48 step bench 150 "$PY" -m tinymoe.distributed.launch --nproc 2 --timeout 120 \
    benchmarks/bench_alltoall.py gpu --out "$OUT"

step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_distributed_nccl.py tests/test_train_distributed.py

step train 100 bash -c "rm -rf runs/moe-gpt-example && \
    $PY -m tinymoe.distributed.launch --nproc 2 --timeout 120 examples/train_moe_gpt.py \
        --expert-parallel --backend nccl --steps 20 && \
    for f in log.jsonl config.json sample.txt loss.png expert_load.png; do \
        cp runs/moe-gpt-example/\$f $OUT/train_\$f; done"

echo "== summary (${SECONDS} s)"
printf '%s' "$SUMMARY"
exit $FAILED
