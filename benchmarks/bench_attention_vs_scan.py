"""Attention's O(L^2) against the selective scan's O(L): time and peak memory vs length.

    python benchmarks/bench_attention_vs_scan.py                 # CPU, prints a table
    python benchmarks/bench_attention_vs_scan.py --out docs/img  # refreshes the figure of docs/performance.md

The plot goes to runs/bench_attention_vs_scan/attention_vs_scan.png (or under --out).

For each sequence length L, one forward of
  - naive attention (the whole (L, L) score matrix per head),
  - tiled attention with the online softmax (blocks of 128 x 128),
  - the selective scan (Mamba's S6, tinymoe.kernels.selective_scan, impl="numba"),
at sizes of one small layer: attention with H heads of d_head (d_model = H d_head),
the scan with d_inner = 2 d_model channels and N states. Peak memory is what
tracemalloc sees above the inputs; time is the best of --repeats runs, all measured
side by side in one process.
"""
from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

from tinymoe.kernels.attention import attention_reference, attention_tiled
from tinymoe.kernels.selective_scan import selective_scan_fwd

# knobs
BATCH, HEADS, D_HEAD, D_STATE = 1, 4, 32, 16
LENGTHS = (256, 512, 1024, 2048, 4096)


def measure(fn, repeats):
    fn()                                             # warm up (Numba compiles here)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    best = min(_time(fn) for _ in range(repeats))
    return best, peak


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(lengths, repeats):
    rng = np.random.default_rng(0)
    d_model = HEADS * D_HEAD
    d_inner = 2 * d_model
    rows = []
    for L in lengths:
        q, k, v = (rng.standard_normal((BATCH, HEADS, L, D_HEAD)).astype(np.float32) for _ in range(3))
        u = rng.standard_normal((BATCH, d_inner, L)).astype(np.float32)
        delta = rng.uniform(0.001, 0.1, (BATCH, d_inner, L)).astype(np.float32)
        A = -np.exp(rng.standard_normal((d_inner, D_STATE))).astype(np.float32)
        B, C = (rng.standard_normal((BATCH, D_STATE, L)).astype(np.float32) for _ in range(2))
        D = np.ones(d_inner, np.float32)
        row = {"L": L}
        for name, fn in (
            ("naive", lambda: attention_reference(q, k, v)),
            ("tiled", lambda: attention_tiled(q, k, v, block_q=128, block_k=128)),
            ("scan", lambda: selective_scan_fwd(u, delta, A, B, C, D, impl="numba")),
        ):
            row[name + "_s"], row[name + "_bytes"] = measure(fn, repeats)
        rows.append(row)
    return rows


def print_table(rows):
    print(f"| L | naive attention ms | naive MB | tiled attention ms | tiled MB | selective scan ms | scan MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} | {r['naive_s'] * 1e3:.1f} | {r['naive_bytes'] / 1e6:.1f} | "
              f"{r['tiled_s'] * 1e3:.1f} | {r['tiled_bytes'] / 1e6:.2f} | "
              f"{r['scan_s'] * 1e3:.2f} | {r['scan_bytes'] / 1e6:.2f} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [r["L"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for name, label in (("naive", "naive attention"), ("tiled", "tiled attention"),
                        ("scan", "selective scan")):
        ax_t.loglog(L, [r[name + "_s"] * 1e3 for r in rows], "o-", label=label)
        ax_m.loglog(L, [r[name + "_bytes"] / 1e6 for r in rows], "o-", label=label)
    ax_t.set(xlabel="sequence length L", ylabel="forward time (ms)", title="time")
    ax_m.set(xlabel="sequence length L", ylabel="peak memory (MB)", title="memory above inputs")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"one layer, CPU: attention {HEADS} heads x {D_HEAD}, scan {2 * HEADS * D_HEAD} "
                 f"channels x {D_STATE} states", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_attention_vs_scan",
                   help="folder for attention_vs_scan.png (created; default %(default)s)")
    args = p.parse_args()
    rows = run(args.lengths, args.repeats)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_vs_scan.png")
    plot(rows, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
