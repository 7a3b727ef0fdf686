"""The roofline model (Williams et al. 2009): attainable FLOP/s = min(peak, bandwidth x I).

An op with arithmetic intensity I (FLOPs per byte moved) below the ridge point
peak / bandwidth is memory-bound: it waits on memory, however fast the ALUs. Matmuls
of large matrices sit right of the ridge (compute-bound); elementwise ops and
reductions sit far left (I < 1).

`measure_peaks` estimates the machine's two numbers with a large matmul and a large
copy; `plot_roofline` draws the roof and one point per op type from a profile.
"""
from __future__ import annotations

import time

from ..backend import module_for


def _best_time(fn, repeats, sync):
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: str = "cpu", n: int = 1024, copy_mb: int = 256, repeats: int = 3,
                  dtype="float32") -> dict:
    """Measured peak FLOP/s (an n x n matmul: 2 n^3 FLOPs) and memory bandwidth (a copy
    of `copy_mb` MB: read once, written once) on `device`."""
    xp = module_for(device)
    sync = (lambda: xp.cuda.Stream.null.synchronize()) if device == "cuda" else (lambda: None)
    a = xp.ones((n, n), dtype=dtype)
    b = xp.ones((n, n), dtype=dtype)
    a @ b                                                     # warm up (BLAS threads, cuBLAS)
    t_mm = _best_time(lambda: a @ b, repeats, sync)
    big = xp.ones(copy_mb * 1024 * 1024 // 4, dtype=xp.float32)
    out = xp.empty_like(big)
    xp.copyto(out, big)
    t_copy = _best_time(lambda: xp.copyto(out, big), repeats, sync)
    return {"flop_per_s": 2.0 * n**3 / t_mm, "bytes_per_s": 2.0 * big.nbytes / t_copy,
            "device": device, "dtype": str(dtype)}


def plot_roofline(rows, peak_flop_per_s: float, bytes_per_s: float, path, title: str = "Roofline"):
    """Save a log-log roofline to `path` (PNG): the roof and one point per row.

    rows: dicts with name, flops, bytes, seconds (as `Profiler.summary()` returns).
    """
    if peak_flop_per_s <= 0 or bytes_per_s <= 0:
        raise ValueError(f"plot_roofline: peaks must be positive, got {peak_flop_per_s} FLOP/s, "
                         f"{bytes_per_s} B/s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = [r for r in rows if r["flops"] > 0 and r["bytes"] > 0 and r["seconds"] > 0]
    ridge = peak_flop_per_s / bytes_per_s
    lo = min([r["flops"] / r["bytes"] for r in points] + [ridge]) / 4
    hi = max([r["flops"] / r["bytes"] for r in points] + [ridge]) * 4
    intensity = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.loglog(intensity, np.minimum(peak_flop_per_s, bytes_per_s * intensity), "k-", lw=2,
              label=f"roof: {peak_flop_per_s / 1e9:.0f} GFLOP/s, {bytes_per_s / 1e9:.0f} GB/s")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    for r in points:
        x, y = r["flops"] / r["bytes"], r["flops"] / r["seconds"]
        ax.loglog([x], [y], "o", ms=6)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
