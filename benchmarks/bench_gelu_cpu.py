"""Exact GELU on the CPU, float32: the one-pass Numba kernel against the NumPy/SciPy spec.

    python benchmarks/bench_gelu_cpu.py [--rows 4096 --d-ff 256 --repeat 20]

The spec is tinymoe/autograd/ops/unary.py :: gelu_exact, gelu_exact_backward (five
NumPy/SciPy passes forward, eight backward, SciPy's erf a scalar loop; Gelu runs them for
float64); the kernel is tinymoe/kernels/gelu_cpu.py. Both run single-threaded here, side
by side, on a hidden of the main job's shape (tokens x top-k rows, d_ff columns); also PyTorch's
`torch.nn.functional.gelu` when torch is importable. Best of `repeat` runs each.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tinymoe.autograd.ops.unary import gelu_exact, gelu_exact_backward
from tinymoe.kernels import gelu_cpu


def best_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.d_ff)).astype(np.float32)     # (rows, d_ff)
    g = rng.standard_normal((a.rows, a.d_ff)).astype(np.float32)
    rows = [("NumPy + SciPy (the spec)", best_ms(lambda: gelu_exact(x), a.repeat),
             best_ms(lambda: gelu_exact_backward(g, x), a.repeat)),
            ("tinymoe Numba kernel", best_ms(lambda: gelu_cpu.gelu(x), a.repeat),
             best_ms(lambda: gelu_cpu.gelu_backward(g, x), a.repeat))]
    try:
        import torch
        torch.set_num_threads(1)
        tx = torch.from_numpy(x).requires_grad_()
        tg = torch.from_numpy(g)
        ty = torch.nn.functional.gelu(tx)
        rows.append((f"PyTorch {torch.__version__} gelu", best_ms(lambda: torch.nn.functional.gelu(tx), a.repeat),
                     best_ms(lambda: torch.autograd.grad(ty, tx, tg, retain_graph=True), a.repeat)))
    except ImportError:
        print("PyTorch is not importable here: its row is left out")
    err = np.abs(gelu_cpu.gelu(x).astype(np.float64) - gelu_exact(x.astype(np.float64))).max()
    print(f"GELU (exact) float32, ({a.rows}, {a.d_ff}), one thread; kernel's largest error vs float64: {err:.1e}")
    print(f"{'implementation':34s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd: spec / this':>17s} {'bwd: spec / this':>17s}")
    for name, fwd, bwd in rows:
        print(f"{name:34s} {fwd:8.3f} {bwd:8.3f} {rows[0][1] / fwd:16.1f}x {rows[0][2] / bwd:16.1f}x")


if __name__ == "__main__":
    main()
