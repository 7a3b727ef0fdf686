"""Attention's L x L matrix vs the tiled online softmax vs Mamba's scan, in a minute.

    python examples/attention_vs_scan.py

Tiled attention (the FlashAttention idea) gives the same output as the naive one
without ever holding the (L, L) scores; the selective scan's memory grows like L.
For the full sweep and the plot: benchmarks/bench_attention_vs_scan.py.
"""
import tracemalloc

import numpy as np

from tinymoe.kernels.attention import attention_reference, attention_tiled
from tinymoe.kernels.selective_scan import selective_scan_fwd

HEADS, D_HEAD, D_INNER, D_STATE = 4, 32, 256, 16
rng = np.random.default_rng(0)


def peak_mb(fn):
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return out, peak


print(f"{'L':>6} {'max |tiled - naive|':>20} {'naive MB':>9} {'tiled MB':>9} {'scan MB':>8}")
for L in (128, 512, 2048):
    q, k, v = (rng.standard_normal((1, HEADS, L, D_HEAD)).astype(np.float32) for _ in range(3))
    naive, naive_mb = peak_mb(lambda: attention_reference(q, k, v))
    tiled, tiled_mb = peak_mb(lambda: attention_tiled(q, k, v, block_q=64, block_k=64))
    u = rng.standard_normal((1, D_INNER, L)).astype(np.float32)
    delta = np.full((1, D_INNER, L), 0.05, np.float32)
    A = -np.ones((D_INNER, D_STATE), np.float32)
    B, C = (rng.standard_normal((1, D_STATE, L)).astype(np.float32) for _ in range(2))
    _, scan_mb = peak_mb(lambda: selective_scan_fwd(u, delta, A, B, C, impl="reference"))
    print(f"{L:>6} {np.abs(tiled - naive).max():>20.2e} {naive_mb:>9.2f} {tiled_mb:>9.2f} {scan_mb:>8.2f}")
