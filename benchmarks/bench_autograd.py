"""Framework overhead per recorded op: forward + backward of a chain of small ops.

    python benchmarks/bench_autograd.py [--device cpu|cuda] [--size 16] [--ops 300]

Compares, in one run, the same computation (a chain of mul, add, tanh on a small
tensor, then backward) in tinymoe, in raw NumPy/CuPy with the backward written by
hand (the floor: no graph at all), and in PyTorch eager when torch is importable.
Reports microseconds per op (forward + backward) and the ratios.
"""
import argparse
import time

import numpy as np

import tinymoe
from tinymoe import backend


def chain_tinymoe(x0, n_ops):
    x = tinymoe.tensor(x0, requires_grad=True)
    y = x
    for i in range(n_ops // 3):
        y = (y * 0.5 + 0.1).tanh()
    y.sum().backward()
    return x.grad


def chain_raw(x0, n_ops):
    xp = backend.array_module(x0)
    ys = []
    y = x0
    for i in range(n_ops // 3):
        y = xp.tanh(y * 0.5 + 0.1)
        ys.append(y)
    g = xp.ones_like(y)
    for y in reversed(ys):  # d tanh = 1 - y^2; d (0.5 y + 0.1) = 0.5
        g = g * (1 - y * y) * 0.5
    return g


def chain_torch(torch, x0, n_ops):
    x = x0.clone().requires_grad_(True)
    y = x
    for i in range(n_ops // 3):
        y = (y * 0.5 + 0.1).tanh()
    y.sum().backward()
    return x.grad


def best_time(fn, sync, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--ops", type=int, default=300)
    args = parser.parse_args()

    x0 = backend.to_device(np.random.default_rng(0).standard_normal((args.size, args.size)).astype(np.float32), args.device)
    n = args.ops
    sync = (lambda: backend.cupy().cuda.Device().synchronize()) if args.device == "cuda" else (lambda: None)

    results = {
        "raw " + ("cupy" if args.device == "cuda" else "numpy") + " (hand backward)": best_time(lambda: chain_raw(x0, n), sync),
        "tinymoe": best_time(lambda: chain_tinymoe(x0, n), sync),
    }
    np.testing.assert_allclose(backend.to_numpy(chain_tinymoe(x0, n)), backend.to_numpy(chain_raw(x0, n)), rtol=1e-5)
    try:
        import torch

        tdev = "cuda" if args.device == "cuda" else "cpu"
        torch.set_num_threads(1)
        tx = torch.tensor(backend.to_numpy(x0), device=tdev)
        tsync = (lambda: torch.cuda.synchronize()) if tdev == "cuda" else (lambda: None)
        results[f"pytorch {torch.__version__} eager"] = best_time(lambda: chain_torch(torch, tx, n), tsync)
    except ImportError:
        print("(torch not importable: no PyTorch comparison)")

    print(f"device={args.device} tensor=({args.size}, {args.size}) float32, chain of {n} ops, forward + backward")
    base = results["tinymoe"]
    for name, seconds in results.items():
        print(f"  {name:38s} {seconds / n * 1e6:8.2f} us/op   tinymoe / this = {base / seconds:5.2f}x")


if __name__ == "__main__":
    main()
