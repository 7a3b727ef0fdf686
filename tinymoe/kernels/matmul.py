"""Matrix products in every format: `matmul(a, b, out=None)` and `same_format(a, b)`.

A product of two 16-bit operands (float16 or bfloat16) is what a tensor core computes:
exact products of 16-bit numbers, summed in float32, rounded once to 16 bits. On a GPU that
is cuBLAS's GemmStridedBatchedEx with a float32 compute type, called by kernels/blas.py for
every 16-bit product, 2-D or batched (CuPy 14 multiplies 2-D bfloat16 matrices but sends
batched ones to an integer fallback that fails). On the CPU NumPy has no 16-bit BLAS
(ml_dtypes' bfloat16 matmul even returns float32), so the operands are widened to float32
(exactly: every 16-bit number is a float32), multiplied by float32 BLAS and the result
rounded: the same numbers, and fast.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import blas
from ..dtypes import is_half


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
    if not backend.is_cupy_array(a):
        return _widened(a, b, out) if is_half(a.dtype) else np.matmul(a, b, out=out)
    if (is_half(a.dtype) and a.dtype == b.dtype) or backend.is_capturing():
        return blas.cublas_matmul(a, b, out=out)          # tensor cores; capturable
    return backend.cupy().matmul(a, b, out=out)


def _widened(a, b, out):
    """a @ b on float32 copies (exact), rounded to a's 16-bit format once (NumPy)."""
    r = np.matmul(a.astype(np.float32), b.astype(np.float32))
    if out is None:
        return r.astype(a.dtype)
    out[...] = r
    return out
