#!/usr/bin/env bash
# 4 or 8 GPUs of one host: the expert x data parallel mesh on NCCL, and issue 14's figures. From the repo root:
#     OUT=/tmp/mgpu_out bash benchmarks/nccl_multi_gpu.sh          # N = every GPU of the host (4 or 8)
# (with CuPy, torch and numba-cuda importable; on the device machine, NumPy < 2.5 first:
#  see docs/kernels.md, "Running on the GPU machine"). About 6-9 minutes on 8 x H200.
# 1. the NCCL selftest on N ranks (every check; the mesh's groups and one step equal to one process
#    on every shape of N: NCCL communicators per EP and DP group, made through the bootstrap)
# 2. bench_alltoall gpu on N ranks: tinymoe vs torch.distributed all_to_all_single, target >= 1.0x
#    at >= 1 MiB per peer; the EP step split                     -> $OUT/alltoall_gpu.json, alltoall_gpu<N>.png
# 3. weak scaling of the MoE GPT (2 experts and 16 x 256 tokens per GPU): 1 GPU (one process, no
#    all-to-all), then EP over 2, 4 (, 8) GPUs, then meshes N/2 EP x 2 DP (and 2 EP x N/2 DP at 8);
#    tokens/s, efficiency vs 1 GPU, all-to-all and all-reduce time, communication share
#                                                   -> $OUT/scaling_w<W>_ep<ep>.json, ep_scaling.png
# 4. the GPU tests of the mesh (4 GPUs, 2 EP x 2 DP, trains like one CPU process to 1e-7)
# 5. 20 steps of examples/train_moe_gpt.py on N GPUs as N/2 EP x 2 DP                     -> $OUT/train_*
# Every step runs under `timeout` (GNU timeout signals the whole process group: no orphaned ranks);
# a failed step does not stop the next one. Exit code: the number of failed steps.
# ONLY="pattern ..." runs the steps whose names match (globs), e.g. two calls of under 300 s each:
#     ONLY="preflight selftest a2a gpu_tests train" BUDGET=290 bash benchmarks/nccl_multi_gpu.sh
#     ONLY="preflight scale_*" BUDGET=290 bash benchmarks/nccl_multi_gpu.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/mgpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-570}          # seconds for the whole script
N=${NGPU:-$(nvidia-smi -L | grep -c '^GPU')}
mkdir -p "$OUT"
FAILED=0
SUMMARY=""

read -ra PATTERNS <<< "${ONLY:-*}"   # read, not a for loop over $ONLY: the globs must not match files

source "$(dirname "$0")/gpu_step.sh"   # step NAME LIMIT_S command...

LAUNCH=("$PY" -m tinymoe.distributed.launch --timeout 120 --nproc)   # then the number of processes (GPUs)

if (( N < 4 )); then
  echo "nccl_multi_gpu.sh: needs 4 or 8 GPUs, found $N (2 GPUs: benchmarks/nccl_2gpu.sh)"; exit 1
fi

step preflight 30 bash -c "nvidia-smi -L; nvidia-smi topo -m; $PY - <<'PY'
import importlib, sys
print('python', sys.version.split()[0])
for m in ('numpy', 'cupy', 'torch', 'numba', 'matplotlib', 'pytest'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'MISSING:', e)
import cupy
from cupy.cuda import nccl; print('GPUs', cupy.cuda.runtime.getDeviceCount(), 'NCCL', nccl.get_version())
PY"

step selftest 120 "${LAUNCH[@]}" "$N" -m tinymoe.distributed.selftest --backend nccl

TAIL=40 step a2a 150 "${LAUNCH[@]}" "$N" benchmarks/bench_alltoall.py gpu --target 1.0 --out "$OUT"

# weak scaling: one configuration per launch (a new world each), the 1-GPU baseline first
SCALE=(--device cuda)
step scale_w1 90 "$PY" benchmarks/bench_ep_scaling.py "${SCALE[@]}" --out "$OUT"
for W in 2 4 8; do
  (( W > N )) && continue
  step "scale_w${W}" 90 "${LAUNCH[@]}" "$W" benchmarks/bench_ep_scaling.py "${SCALE[@]}" --backend nccl \
      --out "$OUT"
done
MESHES=$( (( N >= 8 )) && echo "4 2" || echo "2" )    # EP sizes: 4 EP x 2 DP and 2 EP x 4 DP, or 2 x 2
for EP in $MESHES; do
  step "scale_w${N}_ep${EP}" 90 "${LAUNCH[@]}" "$N" benchmarks/bench_ep_scaling.py "${SCALE[@]}" --backend nccl \
      --ep-size "$EP" --out "$OUT"
done
TAIL=30 step scale_summary 30 "$PY" benchmarks/bench_ep_scaling.py --summarize --out "$OUT"

step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_mesh.py

step train 120 bash -c "rm -rf runs/moe-gpt-mesh && \
    $PY -m tinymoe.distributed.launch --nproc $N --timeout 120 -m tinymoe train --expert-parallel \
        --backend nccl --device cuda --ep-size $((N / 2)) --experts 8 --steps 20 --no-progress \
        --name moe-gpt-mesh --out-dir runs && \
    for f in log.jsonl config.json sample.txt loss.png expert_load.png; do \
        cp runs/moe-gpt-mesh/\$f $OUT/train_\$f; done"

echo "== summary (${SECONDS} s, $N GPUs)"
printf '%s' "$SUMMARY"
exit $FAILED
