"""The activation kernels on the GPU: activation.cu's whole-array kernels vs the
cupy.ElementwiseKernel forms of the same functions, against a copy's bandwidth.

    python benchmarks/bench_activations.py [--n 67108864]

n elements (default 2^26: the MoE benchmark's hidden, 32768 rows x 2048) of float32,
float16 and bfloat16; GELU, SiLU and softplus forward (read x, write y) and backward (read g
and x, write dx). Each row: time per call (CUDA events around back-to-back calls, median of
rounds) and the bytes moved per second. All in one run, one device.
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinymoe  # noqa: E402
from tinymoe.dtypes import bfloat16  # noqa: E402
from tinymoe.kernels import elementwise  # noqa: E402

cp = tinymoe.backend.cupy()


def gpu_ms(fn, reps=20, rounds=5):
    fn()
    times = []
    for _ in range(rounds):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / reps)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2**26)
    a = p.parse_args()
    print(f"device {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}; n = {a.n:,} elements")
    print(f"\n{'dtype':9s} {'op':22s} {'ElementwiseKernel':>18s} {'activation.cu':>15s} {'speed-up':>9s}")
    for dtype in [np.float32, np.float16] + ([bfloat16] if bfloat16 is not None else []):
        rng = cp.random.default_rng(0)
        x = rng.standard_normal(a.n, dtype=cp.float32).astype(dtype)
        g = rng.standard_normal(a.n, dtype=cp.float32).astype(dtype)
        y = cp.empty_like(x)
        copy = gpu_ms(lambda: cp.copyto(y, x))
        name = np.dtype(dtype).name
        print(f"{name:9s} {'copy (reference)':22s} {'':>18s} {copy * 1e3:9.0f} us  "
              f"({2 * x.nbytes / copy / 1e9:.2f} TB/s)")
        for op in ("gelu", "silu", "softplus"):
            fwd, bwd = getattr(elementwise, op), getattr(elementwise, op + "_backward")
            old_fwd = elementwise.kernel(op, dtype)
            old_bwd = elementwise.kernel(op + "_backward", dtype)
            for what, new, old, nbytes in (
                    ("forward", lambda: fwd(x), lambda: old_fwd(x), 2 * x.nbytes),
                    ("backward", lambda: bwd(g, x), lambda: old_bwd(g, x), 3 * x.nbytes)):
                t_old, t_new = gpu_ms(old), gpu_ms(new)
                print(f"{name:9s} {op + ' ' + what:22s} {t_old * 1e3:6.0f} us {nbytes / t_old / 1e9:5.2f} TB/s"
                      f" {t_new * 1e3:5.0f} us {nbytes / t_new / 1e9:4.2f} TB/s {t_old / t_new:7.2f}x")


if __name__ == "__main__":
    main()
