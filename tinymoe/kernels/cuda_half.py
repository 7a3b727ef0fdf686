"""16-bit storage in Numba CUDA kernels: load as float32, compute, store rounded.

A kernel written once for a float type T is instantiated per storage format by the two
device functions it reads and writes its 16-bit arrays through (`codec(dtype)`):

    format     array the kernel sees     load(x) -> float32             store(v) -> element
    float32/64 as is                     x                              v
    float16    float16                   float32(x)                     float16(v) (nearest even)
    bfloat16   its bits, a uint16 view   the bits as a float32's high   float32 bits rounded to
                                         half (bfloat16 is float32      nearest even, high half
                                         with 16 mantissa bits cut)

Numba has no bfloat16 type that takes CuPy's (ml_dtypes') arrays, so bfloat16 travels as
uint16 and the conversion is bit arithmetic: float32 -> bfloat16 adds 0x7FFF plus the lowest
kept bit (round half to even, as ml_dtypes and the hardware do) and keeps the high 16 bits.
On a GPU the bit casts are libdevice's int_as_float / float_as_int (one mov); under
NUMBA_ENABLE_CUDASIM=1 (no libdevice) the same casts are NumPy views.
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda, float32, int32, uint16, uint32
from numba.types import float16

from ..dtypes import bfloat16

if not config.ENABLE_CUDASIM:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _as_float(bits):
        return libdevice.int_as_float(int32(bits))

    @cuda.jit(device=True, inline=True)
    def _as_bits(v):
        return uint32(libdevice.float_as_int(v))

else:  # the simulator: Python numbers, NumPy views for the bit casts

    @cuda.jit(device=True)
    def _as_float(bits):
        return np.array(int(bits) & 0xFFFFFFFF, np.uint32).view(np.float32)[()]

    @cuda.jit(device=True)
    def _as_bits(v):
        return np.uint32(np.array(v, np.float32).view(np.uint32)[()])


@cuda.jit(device=True, inline=True)
def bf16_load(bits):
    """bfloat16 bits (uint16) -> float32: they are the float32's high 16 bits."""
    return _as_float(uint32(bits) << uint32(16))


@cuda.jit(device=True, inline=True)
def bf16_store(v):
    """float32 -> bfloat16 bits, rounded to nearest, ties to even; NaN stays a (quiet) NaN."""
    if v != v:
        return uint16(0x7FC0)
    u = _as_bits(float32(v))
    u = u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))
    return uint16(u >> uint32(16))


@cuda.jit(device=True, inline=True)
def f16_load(x):
    return float32(x)


@cuda.jit(device=True, inline=True)
def f16_store(v):
    return float16(v)


@cuda.jit(device=True, inline=True)
def same(x):
    return x


def codec(dtype):
    """(load, store, compute dtype) for arrays stored as `dtype`."""
    dtype = np.dtype(dtype)
    if bfloat16 is not None and dtype == bfloat16:
        return bf16_load, bf16_store, np.dtype(np.float32)
    if dtype == np.float16:
        return f16_load, f16_store, np.dtype(np.float32)
    return same, same, dtype


def kernel_view(a):
    """What a kernel is given for array a: its bits as uint16 for bfloat16, a itself else."""
    if bfloat16 is not None and a.dtype == bfloat16:
        return a.view(np.uint16)
    return a
