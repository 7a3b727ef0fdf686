"""Attention's L x L matrix vs the tiled online softmax vs Mamba's scan, in a minute.

    python examples/attention_vs_scan.py [--device cuda]

Tiled attention (the FlashAttention idea) gives the same output as the naive one
without ever holding the (L, L) scores; the selective scan's memory grows like L.
Peak memory of each call: tracemalloc on the CPU, CuPy's memory pool on the GPU
(tinymoe.profile.memory.track_memory). For the full sweep and the plot:
benchmarks/bench_attention_vs_scan.py.
"""
import argparse

import numpy as np

from tinymoe.backend import module_for, to_numpy
from tinymoe.kernels.attention import attention_reference, attention_tiled
from tinymoe.kernels.selective_scan import selective_scan_fwd
from tinymoe.profile.memory import track_memory

HEADS, D_HEAD, D_INNER, D_STATE = 4, 32, 256, 16


def peak_mb(fn, device):
    with track_memory(device) as mem:
        out = fn()
    return out, mem.peak / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    xp, dev = module_for(args.device), args.device
    rng = np.random.default_rng(0)

    def randn(*shape):                                       # float32 on the device
        return xp.asarray(rng.standard_normal(shape).astype(np.float32))

    print(f"{'L':>6} {'max |tiled - naive|':>20} {'naive MB':>9} {'tiled MB':>9} {'scan MB':>8}")
    for L in (128, 512, 2048):
        q, k, v = (randn(1, HEADS, L, D_HEAD) for _ in range(3))
        naive, naive_mb = peak_mb(lambda: attention_reference(q, k, v), dev)
        tiled, tiled_mb = peak_mb(lambda: attention_tiled(q, k, v, block_q=64, block_k=64), dev)
        u = randn(1, D_INNER, L)
        delta = xp.full((1, D_INNER, L), 0.05, np.float32)
        A = -xp.ones((D_INNER, D_STATE), np.float32)
        B, C = randn(1, D_STATE, L), randn(1, D_STATE, L)
        _, scan_mb = peak_mb(lambda: selective_scan_fwd(u, delta, A, B, C, impl="reference"), dev)
        error = float(np.abs(to_numpy(tiled) - to_numpy(naive)).max())
        print(f"{L:>6} {error:>20.2e} {naive_mb:>9.2f} {tiled_mb:>9.2f} {scan_mb:>8.2f}")


if __name__ == "__main__":
    main()
