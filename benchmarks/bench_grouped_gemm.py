"""The grouped expert products (kernels/grouped_gemm.cu) against cuBLAS, one launch per expert.

    python benchmarks/bench_grouped_gemm.py [--rows 32768 --d 512 --f 2048 --experts 8]
                                            [--configs 32x4x8,64x3x8,64x3x4]

The six products of an MoE layer's experts, forward and backward (GELU FFN d -> f -> d):
    up    (R, d) @ W1[e] (d, f)      down   (R, f) @ W2[e] (f, d)          forward
    dX    (R, f) @ W1[e]^T           dH     (R, d) @ W2[e]^T               backward, rows
    dW1   X^T (d, R) @ dH (R, f)     dW2    H^T (f, R) @ dY (R, d)         backward, weights
with R rows in E groups of random sizes (a top-2 router's load: multinomial over experts with
probabilities from a Dirichlet(2)). Rows: the grouped kernel (one launch, the bounds on the
device) and cuBLAS's GemmEx per expert with the bounds on the host (what the loop in
nn/moe/experts.py runs, not counting the device sync that brings the bounds there), in
bfloat16, both timed by CUDA events over back-to-back calls; TFLOP/s counts 2 R K N.
--configs first times the six grouped products for other pipelines (BKxSTAGESxWARPS: slices of
BK along the sum, a ring of STAGES shared buffers, WARPS warps a block; grouped_gemm.Pipeline),
each checked against cuBLAS.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench_moe import cp, gpu_ms  # noqa: E402  (CUDA events around back-to-back calls)
from tinymoe.dtypes import bfloat16  # noqa: E402
from tinymoe.kernels import grouped_gemm  # noqa: E402
from tinymoe.kernels.matmul import matmul  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--configs", default="", help="pipelines to compare, e.g. 32x4x8,64x3x4")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    sizes = rng.multinomial(a.rows, rng.dirichlet(np.full(a.experts, 2.0)))
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    offsets = cp.asarray(bounds)
    R, E = a.rows, a.experts

    def arr(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(bfloat16)

    x, h, dy, dh = arr(R, a.d), arr(R, a.f), arr(R, a.d), arr(R, a.f)
    w1, w2 = arr(E, a.d, a.f), arr(E, a.f, a.d)

    def loop_rows(xs, W, transpose=False):
        out = cp.empty((R, W.shape[1] if transpose else W.shape[2]), xs.dtype)
        for e in range(E):
            lo, hi = int(bounds[e]), int(bounds[e + 1])
            if hi > lo:
                matmul(xs[lo:hi], W[e].T if transpose else W[e], out=out[lo:hi])
        return out

    def loop_weights(xs, g):
        out = cp.empty((E, xs.shape[1], g.shape[1]), xs.dtype)
        for e in range(E):
            lo, hi = int(bounds[e]), int(bounds[e + 1])
            matmul(xs[lo:hi].T, g[lo:hi], out=out[e])
        return out

    def cases(ring=grouped_gemm.DEFAULT):
        rows, weights = grouped_gemm.grouped_rows, grouped_gemm.grouped_weights
        return [
            ("up    X W1", lambda: rows(x, w1, offsets, pipeline=ring), lambda: loop_rows(x, w1), a.d, a.f),
            ("down  H W2", lambda: rows(h, w2, offsets, pipeline=ring), lambda: loop_rows(h, w2), a.f, a.d),
            ("dX    dH W1^T", lambda: rows(dh, w1, offsets, transpose=True, pipeline=ring),
             lambda: loop_rows(dh, w1, True), a.f, a.d),
            ("dH    dY W2^T", lambda: rows(dy, w2, offsets, transpose=True, pipeline=ring),
             lambda: loop_rows(dy, w2, True), a.d, a.f),
            ("dW1   X^T dH", lambda: weights(x, dh, offsets, pipeline=ring), lambda: loop_weights(x, dh), a.d, a.f),
            ("dW2   H^T dY", lambda: weights(h, dy, offsets, pipeline=ring), lambda: loop_weights(h, dy), a.f, a.d),
        ]

    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device {dev}; rows {R} in {E} groups {sizes.tolist()}; d={a.d} f={a.f}; bfloat16")
    if a.configs:
        compare_rings(a.configs, cases)
    print(f"\n{'product':16s} {'grouped ms':>10s} {'TFLOP/s':>8s} {'cuBLAS loop ms':>14s} {'TFLOP/s':>8s} "
          f"{'grouped/loop':>12s}")
    total = [0.0, 0.0]
    for name, grouped, loop, k, n in cases():
        flops = 2 * R * k * n
        g_ms, l_ms = gpu_ms(grouped, reps=20), gpu_ms(loop, reps=20)
        total[0] += g_ms
        total[1] += l_ms
        print(f"{name:16s} {g_ms:10.3f} {flops / g_ms / 1e9:8.1f} {l_ms:14.3f} {flops / l_ms / 1e9:8.1f} "
              f"{g_ms / l_ms:11.2f}x")
    print(f"{'all six':16s} {total[0]:10.3f} {'':8s} {total[1]:14.3f} {'':8s} {total[0] / total[1]:11.2f}x")


def compare_rings(configs, cases):
    """One row per pipeline: each product's ms, the six's sum, and the largest difference from
    cuBLAS relative to the largest |result| (bfloat16 rounding: about 4e-3)."""
    print(f"\n{'BKxSTAGESxWARPS':15s} {'smem KiB':>8s} " + " ".join(f"{c[0][:5].strip():>6s}" for c in cases())
          + f" {'all ms':>7s} {'max diff':>9s}")
    for spec in configs.split(","):
        ring = grouped_gemm.Pipeline(*(int(v) for v in spec.split("x")))
        times, diff = [], 0.0
        for _, grouped, loop, _, _ in cases(ring):
            got, want = grouped().astype(cp.float32), loop().astype(cp.float32)
            diff = max(diff, float(cp.abs(got - want).max() / cp.abs(want).max()))
            times.append(gpu_ms(grouped, reps=20))
        print(f"{spec:15s} {ring.shared_bytes() / 1024:8.0f} " + " ".join(f"{t:6.3f}" for t in times)
              + f" {sum(times):7.3f} {diff:9.2e}")


if __name__ == "__main__":
    main()
