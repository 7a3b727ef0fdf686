"""TF32: float32 matmuls on tensor cores, with inputs rounded to 10 mantissa bits.

An NVIDIA GPU since Ampere multiplies float32 matrices either in full float32 (CUDA cores:
51 TFLOP/s on an H200) or as TensorFloat-32 (tensor cores: inputs rounded to float32's
range with 10 mantissa bits, bfloat16's exponent and float16's mantissa, products summed in
float32: 420 TFLOP/s measured with CuPy, issue 16). Which one is cuBLAS's compute type for
float32 products; CuPy keeps it per dtype (cupy._core._routines_linalg.set_compute_type, the
same switch as the CUPY_TF32=1 environment variable, which is only read once), and the math
mode of the cuBLAS handle that captured steps call (kernels/blas.py). Nothing else
changes: storage, elementwise math and reductions stay float32. The CPU has no TF32.
"""
from __future__ import annotations

import numpy as np

from .. import backend

_DEFAULT, _TF32 = 1, 7        # CuPy's COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 (cupy/_core)
_enabled = False


def set_tf32(enabled: bool) -> None:
    """cuBLAS float32 matmuls in TF32 (True) or full float32 (False); nothing without CuPy."""
    global _enabled
    _enabled = bool(enabled)
    if not backend.cuda_available():
        return
    from ..kernels import blas

    blas.set_tf32(enabled)                   # the cuBLAS handle a captured step's GEMMs use
    from cupy._core import _routines_linalg as linalg

    tf32 = getattr(linalg, "COMPUTE_TYPE_TF32", _TF32)
    default = getattr(linalg, "COMPUTE_TYPE_DEFAULT", _DEFAULT)
    linalg.set_compute_type(np.float32, tf32 if enabled else default)


def tf32_enabled() -> bool:
    return _enabled
