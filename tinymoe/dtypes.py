"""Floating-point formats: float64, float32, float16 and bfloat16 (from ml_dtypes).

    format     bits (sign, exponent, mantissa)   eps (2^-mantissa)   largest finite
    float64    1, 11, 52                          2.2e-16              1.8e308
    float32    1,  8, 23                          1.2e-07              3.4e38
    bfloat16   1,  8,  7                          7.8e-03              3.4e38   (float32's range)
    float16    1,  5, 10                          9.8e-04              65504    (small range)

NumPy has float16 but no bfloat16; ml_dtypes (Google's, the one JAX uses) adds it, and CuPy
holds and multiplies arrays of it. Its dtype has kind "V" (not "f"), so "is this a float?"
is `is_floating(dtype)`, never `dtype.kind in "f"`.

Half formats store and multiply; sums run in float32 (`accumulation_dtype`): adding n numbers
of relative precision eps loses up to n * eps, and bfloat16's eps of 1/128 means that a sum of
256 equal terms stops growing (x + x/256 rounds back to x).
"""
from __future__ import annotations

import numpy as np

try:  # a declared dependency; kept optional so that a bare NumPy install still imports
    import ml_dtypes as _ml_dtypes
    bfloat16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    bfloat16 = None

float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
HALF = tuple(d for d in (float16, bfloat16) if d is not None)

NAMES = {"float64": float64, "float32": float32, "float16": float16, "fp16": float16,
         "half": float16}
if bfloat16 is not None:
    NAMES.update(bfloat16=bfloat16, bf16=bfloat16)


def as_dtype(dtype) -> np.dtype:
    """np.dtype of a dtype or a name ("bfloat16", "bf16", "float16", ...)."""
    if isinstance(dtype, str) and dtype in NAMES:
        return NAMES[dtype]
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        raise ImportError("bfloat16 needs the ml_dtypes package: pip install ml_dtypes")
    return np.dtype(dtype)


def is_floating(dtype) -> bool:
    """float16/32/64, complex, or bfloat16 (whose NumPy kind is "V")."""
    dtype = as_dtype(dtype)
    return dtype.kind in "fc" or (bfloat16 is not None and dtype == bfloat16)


def is_half(dtype) -> bool:
    """float16 or bfloat16: stored and multiplied in 16 bits, summed in float32."""
    return as_dtype(dtype) in HALF


def accumulation_dtype(dtype) -> np.dtype:
    """The dtype that sums, norms and softmaxes of `dtype` data run in: float32 for the
    half formats, the dtype itself otherwise."""
    return float32 if is_half(dtype) else as_dtype(dtype)


def eps(dtype) -> float:
    """Machine epsilon: the gap between 1 and the next representable number."""
    return float(finfo(dtype).eps)


def finfo(dtype):
    """np.finfo, also for bfloat16 (ml_dtypes.finfo)."""
    dtype = as_dtype(dtype)
    if bfloat16 is not None and dtype == bfloat16:
        return _ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def upcast(*arrays):
    """Each half-precision array as float32 (a copy), every other argument unchanged."""
    return tuple(a.astype(float32) if a is not None and hasattr(a, "dtype") and is_half(a.dtype)
                 else a for a in arrays)
