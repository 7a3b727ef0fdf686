"""Top-k of short rows on the GPU in one launch (CUDA C in topk.cu), without a sort.

    values, indices = topk_rows(x, k, largest=True)     x (..., n) with n <= MAX_N, contiguous

The routers take the top k of E expert scores per token; CuPy's argsort for that is a Thrust
sort that synchronizes with the host, which a captured CUDA graph forbids (and costs a sync
per router in eager mode). Equal to a stable argsort: ties go to the lower index.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy

SOURCE = Path(__file__).with_name("topk.cu")
MAX_N = 64                  # one bit per entry of a row in a 64-bit mask
THREADS = 128
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@lru_cache(maxsize=None)
def _module():
    return cupy().RawModule(code=SOURCE.read_text(),
                            name_expressions=[f"topk_rows<{c}>" for c in CTYPES.values()])


def supports(x, k) -> bool:
    return x.dtype in CTYPES and 1 <= k <= x.shape[-1] <= MAX_N and x.size > 0


def topk_rows(x, k: int, largest: bool = True):
    """-> values (..., k) sorted (largest first, or smallest), indices (..., k) int64."""
    cp = cupy()
    if not supports(x, k):
        raise ValueError(f"topk_rows: needs float32/float64 rows of 1..{MAX_N} entries and "
                         f"1 <= k <= n, got {x.dtype}{tuple(x.shape)}, k={k}")
    n = x.shape[-1]
    x2 = cp.ascontiguousarray(x).reshape(-1, n)                          # (rows, n)
    rows = x2.shape[0]
    values = cp.empty((rows, k), x.dtype)
    indices = cp.empty((rows, k), cp.int64)
    fn = _module().get_function(f"topk_rows<{CTYPES[x.dtype]}>")
    fn((-(-rows // THREADS),), (THREADS,), (x2, np.int64(rows), np.int32(n), np.int32(k),
                                            np.bool_(largest), values, indices))
    return values.reshape(x.shape[:-1] + (k,)), indices.reshape(x.shape[:-1] + (k,))
