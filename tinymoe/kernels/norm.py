"""Fused LayerNorm and RMSNorm on the GPU: one launch per forward, two per backward.

Written in CuPy array code (tinymoe/autograd/ops/norm.py, the spec), a LayerNorm forward is
~10 kernels (mean, subtract, square, mean, add, sqrt, divide, multiplies) and its backward
~14 (the means of g and g xhat, the dw, db sums), each a Python-side launch of 10-40 us:
on a small model the step waits on the host. Here (CUDA C in norm.cu, compiled per dtype):

    layer_norm_forward(x, w, b, eps)       -> (y, mean, rstd)      1 launch
    layer_norm_backward(dy, x, w, mean, rstd, needs=(True, True, True))
                                           -> (dx, dw, db)         dx: 1, dw and db: 1 (+ a memset)
    rms_norm_forward(x, w, eps)            -> (y, rstd)            1 launch
    rms_norm_backward(dy, x, w, rstd, needs=(True, True))
                                           -> (dx, dw)             dx: 1, dw: 1 (+ a memset)

Shapes: x, dy, y, dx (rows, d) C-contiguous; w, b, dw, db (d,); mean, rstd (rows,). x, w, b,
dy of one dtype: float32, float64, float16 or bfloat16; sums are taken in float32 for the
last three (float64 for float64), and mean, rstd, dw, db are returned in that type. b may be None; an
output the caller does not need (needs[i] False) is None and costs nothing. The backward
recomputes xhat = (x - mean) rstd from what the forward saved (two (rows,) vectors, not a
(rows, d) xhat). dw and db are deterministic: no float atomics (see norm.cu).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy
from ..dtypes import accumulation_dtype, as_dtype, bfloat16, float16, is_half

SOURCE = Path(__file__).with_name("norm.cu")
WARP = 32
WARPS = 4             # rows per block of the row kernels (one warp per row)
COLS, ROWS_Y = 32, 8  # the dw/db kernel's block: 32 columns x 8 threads down the rows
MIN_CHUNK_ROWS = 64   # a dw/db block sums at least this many rows (8 per thread) ...
TARGET_BLOCKS = 512   # ... and the grid is split into row chunks up to about this many blocks


CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", float16: "__half"}
if bfloat16 is not None:
    CTYPES[bfloat16] = "__nv_bfloat16"
DTYPES = tuple(CTYPES)


def nvcc_options(dtype):
    """The -D defines that specialise norm.cu (also used by the compile test): the storage
    type data_t, the sum type scalar_t (float for the 16-bit formats)."""
    dtype = as_dtype(dtype)
    half = ("-DHALF_TYPES",) if is_half(dtype) else ()
    return (f"-Ddata_t={CTYPES[dtype]}", f"-Dscalar_t={CTYPES[accumulation_dtype(dtype)]}",
            *half, f"-DWARPS={WARPS}", f"-DCOLS={COLS}", f"-DROWS_Y={ROWS_Y}")


@lru_cache(maxsize=None)
def _module(dtype):
    return cupy().RawModule(code=SOURCE.read_text(), options=nvcc_options(dtype))


@lru_cache(maxsize=None)
def _function(name, dtype_str):
    return _module(dtype_str).get_function(name)


def _kernel(name, dtype):
    """The kernel, looked up once per dtype (get_function asks the driver on every call:
    on this host-bound path, three times per LayerNorm per step)."""
    return _function(name, np.dtype(dtype).name)        # "bfloat16": its .str is a void "<V2"


def _check(name, x, *vectors):
    """x (rows, d) and each vector (d,) (or None) of one float dtype; returns (rows, d, dtype)."""
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be (rows, d), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}: float32, float64, float16 or bfloat16 arrays only, got {x.dtype}")
    rows, d = x.shape
    for v in vectors:
        if v is not None and (tuple(v.shape) != (d,) or v.dtype != x.dtype):
            raise ValueError(f"{name}: expected a {x.dtype}({d},) vector for x {tuple(x.shape)}, "
                             f"got {v.dtype}{tuple(v.shape)}")
    if rows >= 2**31 or d >= 2**31:
        raise ValueError(f"{name}: rows and d must each be below 2^31, got {tuple(x.shape)}")
    return rows, d, x.dtype


def _row_grid(rows):
    return ((rows + WARPS - 1) // WARPS,), (WARPS * WARP,)


def layer_norm_forward(x, w, b, eps):
    """y = (x - mean) rstd w + b, with mean and rstd = 1 / sqrt(var + eps) per row
    (two-pass variance). x (rows, d); w, b (d,) (b may be None).
    Returns y (rows, d), mean (rows,), rstd (rows,)."""
    cp = cupy()
    rows, d, dtype = _check("layer_norm_forward", x, w, b)
    has_bias = b is not None
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    b = cp.ascontiguousarray(b) if has_bias else w             # not read without a bias
    acc = accumulation_dtype(dtype)
    y = cp.empty((rows, d), dtype)
    mean, rstd = cp.empty(rows, acc), cp.empty(rows, acc)
    if x.size:
        _kernel("layer_norm_fwd", dtype)(*_row_grid(rows), (
            x, w, b, np.bool_(has_bias), np.int32(rows), np.int32(d), acc.type(eps),
            y, mean, rstd))
    return y, mean, rstd


def rms_norm_forward(x, w, eps):
    """y = x rstd w, rstd = 1 / sqrt(mean(x^2) + eps) per row. x (rows, d); w (d,).
    Returns y (rows, d), rstd (rows,)."""
    cp = cupy()
    rows, d, dtype = _check("rms_norm_forward", x, w)
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    acc = accumulation_dtype(dtype)
    y, rstd = cp.empty((rows, d), dtype), cp.empty(rows, acc)
    if x.size:
        _kernel("rms_norm_fwd", dtype)(*_row_grid(rows), (
            x, w, np.int32(rows), np.int32(d), acc.type(eps), y, rstd))
    return y, rstd


def _chunks(rows, d):
    """(chunks, rows per chunk) of the dw/db grid: a function of the shape alone, so the
    summation order (and the bits of dw, db) never change between runs or devices."""
    tiles = (d + COLS - 1) // COLS
    chunks = max(1, min((rows + MIN_CHUNK_ROWS - 1) // MIN_CHUNK_ROWS, TARGET_BLOCKS // tiles))
    per_chunk = (rows + chunks - 1) // chunks
    return (rows + per_chunk - 1) // per_chunk, per_chunk


def _dw_db(dy, x, mean, rstd, need_db):
    """dw = sum_r dy xhat, db = sum_r dy (None unless need_db); mean None for RMSNorm."""
    cp = cupy()
    rows, d = x.shape
    dtype = accumulation_dtype(x.dtype)                        # dw, db: float32 for halves
    if x.size == 0:                                            # a sum over no rows
        return cp.zeros(d, dtype), cp.zeros(d, dtype) if need_db else None
    dw = cp.empty(d, dtype)
    db = cp.empty(d, dtype) if need_db else None
    tiles = (d + COLS - 1) // COLS
    chunks, per_chunk = _chunks(rows, d)
    if chunks > 1:
        part = cp.empty((2 * chunks, d), dtype)                # dw partials, then db partials
        counter = cp.zeros(tiles, np.int32)                    # tickets per column tile
    else:
        part, counter = dw, cp.empty(0, np.int32)              # neither is touched
    _kernel("norm_bwd_dwdb", x.dtype)((tiles, chunks), (COLS, ROWS_Y), (
        dy, x, rstd if mean is None else mean, rstd, np.bool_(mean is not None),
        np.bool_(need_db), np.int32(rows), np.int32(d), np.int32(per_chunk), part, counter,
        dw, dw if db is None else db))
    return dw, db


def layer_norm_backward(dy, x, w, mean, rstd, needs=(True, True, True)):
    """With g = dy w and xhat = (x - mean) rstd:
        dx = rstd (g - mean_c(g) - xhat mean_c(g xhat))     (one launch, warp per row)
        dw = sum_r dy xhat,  db = sum_r dy                   (one launch, deterministic)
    dy, x (rows, d); w (d,); mean, rstd (rows,) from layer_norm_forward.
    Returns (dx, dw, db); each is None where `needs` says False."""
    cp = cupy()
    rows, d, dtype = _check("layer_norm_backward", x, w)
    dy = cp.ascontiguousarray(dy, dtype=dtype)
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    need_dx, need_dw, need_db = needs
    dx = dw = db = None
    if need_dx:
        dx = cp.empty((rows, d), dtype)
        if x.size:
            _kernel("layer_norm_bwd_dx", dtype)(*_row_grid(rows), (
                dy, x, w, mean, rstd, np.int32(rows), np.int32(d), dx))
    if need_dw or need_db:
        dw, db = _dw_db(dy, x, mean, rstd, need_db)
        dw = dw if need_dw else None
    return dx, dw, db


def rms_norm_backward(dy, x, w, rstd, needs=(True, True)):
    """With g = dy w and xhat = x rstd:
        dx = rstd (g - xhat mean_c(g xhat))                  (one launch, warp per row)
        dw = sum_r dy xhat                                   (one launch, deterministic)
    dy, x (rows, d); w (d,); rstd (rows,) from rms_norm_forward.
    Returns (dx, dw); each is None where `needs` says False."""
    cp = cupy()
    rows, d, dtype = _check("rms_norm_backward", x, w)
    dy = cp.ascontiguousarray(dy, dtype=dtype)
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    need_dx, need_dw = needs
    dx = dw = None
    if need_dx:
        dx = cp.empty((rows, d), dtype)
        if x.size:
            _kernel("rms_norm_bwd_dx", dtype)(*_row_grid(rows), (
                dy, x, w, rstd, np.int32(rows), np.int32(d), dx))
    if need_dw:
        dw, _ = _dw_db(dy, x, None, rstd, False)
    return dx, dw
