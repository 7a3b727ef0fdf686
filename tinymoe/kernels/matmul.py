"""Matrix products in every format: `matmul(a, b, out=None)` and `same_format(a, b)`.

A product of two 16-bit operands (float16 or bfloat16) is what a tensor core computes:
exact products of 16-bit numbers, summed in float32, rounded once to 16 bits. On a GPU that
is cuBLAS (CuPy's matmul of 16-bit arrays accumulates in float32). On the CPU NumPy has no
16-bit BLAS (ml_dtypes' bfloat16 matmul even returns float32), so the operands are widened
to float32 (exactly: every 16-bit number is a float32), multiplied by float32 BLAS and the
result rounded: the same numbers, and fast.

CuPy 14 multiplies bfloat16 matrices (2-D, through cuBLAS) but sends batched (N-D @ N-D)
bfloat16 products to its integer fallback, which fails (measured on an H200). So a bfloat16
(..., K) @ (K, N) is run as one 2-D product over the flattened rows, and a batched one as a
float32 product of the widened operands: exact inputs (bfloat16 fits in TF32's 10 mantissa
bits, so TF32 tensor cores give the same numbers), float32 sums, rounded once.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import blas
from ..dtypes import bfloat16, is_half


def same_format(a, b):
    """(a, b) with a float32/64 operand narrowed to the other's 16-bit format, if either is
    16-bit: a product with one 16-bit operand runs in 16 bits (mixed precision's matmul rule)."""
    if a.dtype == b.dtype:
        return a, b
    if is_half(a.dtype) and not is_half(b.dtype):
        return a, b.astype(a.dtype)
    if is_half(b.dtype) and not is_half(a.dtype):
        return a.astype(b.dtype), b
    return a, b


def matmul(a, b, out=None):
    """a @ b (NumPy's broadcasting rules); 16-bit operands accumulate in float32 and the
    result is rounded to their format. `out` as in NumPy."""
    if is_half(a.dtype) and not backend.is_cupy_array(a):
        return _widened(np, a, b, out)
    xp = backend.array_module(a)
    if bfloat16 is None or a.dtype != bfloat16 or (a.ndim == 2 and b.ndim == 2):
        if out is None:
            return blas.matmul(a, b)                      # cuBLAS directly while capturing
        if backend.is_capturing():
            out[...] = blas.matmul(a, b)
            return out
        return xp.matmul(a, b, out=out)
    if b.ndim == 2 and a.ndim > 2:                        # (..., K) @ (K, N) as one 2-D product
        y = xp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
        if out is None:
            return y
        out[...] = y
        return out
    return _widened(xp, a, b, out)                        # batched bfloat16 on CuPy


def _widened(xp, a, b, out):
    """a @ b on float32 copies (exact), rounded to a's 16-bit format once."""
    r = xp.matmul(a.astype(np.float32), b.astype(np.float32))
    if out is None:
        return r.astype(a.dtype)
    out[...] = r
    return out
