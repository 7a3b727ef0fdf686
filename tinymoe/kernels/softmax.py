"""Attention's causal softmax on the GPU: one launch forward, one backward (softmax.cu).

    p, lse = causal_softmax_forward(s, scale, keep_lse=False)   P = softmax(S scale + M)
    p = causal_softmax_recompute(s, scale, lse)                  P = exp(S scale - lse) (+ M)
    ds = causal_softmax_backward(dp, p, dout, out, scale)        dS = P (dP - rowsum(dO O)) scale

Shapes: s, p, dp, ds (..., Lq, Lk), the last Lq of Lk positions querying (the causal mask M
is applied by index: query i sees keys j <= i + Lk - Lq); dout, out (..., Lq, d); lse
(..., Lq, 1). Arrays of one dtype: float32, float64, float16 or bfloat16; sums and lse in
float32 (float64 for float64); P and dS in the arrays' dtype. The array-code spec these
equal (to rounding) is tinymoe/nn/attention.py :: CausalAttention on NumPy arrays.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy
from ..dtypes import accumulation_dtype, as_dtype, is_half
from .norm import CTYPES, DTYPES

SOURCE = Path(__file__).with_name("softmax.cu")
WARP, WARPS = 32, 4     # one warp per row, WARPS rows per block


def nvcc_options(dtype):
    """The -D defines that specialise softmax.cu (also used by the compile test)."""
    dtype = as_dtype(dtype)
    half = ("-DHALF_TYPES",) if is_half(dtype) else ()
    return (f"-Ddata_t={CTYPES[dtype]}", f"-Dscalar_t={CTYPES[accumulation_dtype(dtype)]}",
            *half, f"-DWARPS={WARPS}")


@lru_cache(maxsize=None)
def _function(name, dtype_name):
    module = cupy().RawModule(code=SOURCE.read_text(), options=nvcc_options(dtype_name))
    return module.get_function(name)


def supports(*arrays) -> bool:
    """True when these CuPy arrays can take the fused kernels (one dtype the kernels know)."""
    return len({a.dtype for a in arrays}) == 1 and arrays[0].dtype in DTYPES


def _rows(op, s):
    if s.ndim < 2 or s.dtype not in DTYPES:
        raise ValueError(f"{op}: expected a float32, float64, float16 or bfloat16 (..., Lq, Lk) "
                         f"array, got {s.dtype}{tuple(s.shape)}")
    Lq, Lk = s.shape[-2:]
    if Lq > Lk or s.size >= 2**31 * Lk:
        raise ValueError(f"{op}: need Lq <= Lk (queries are the last Lq positions) and fewer than "
                         f"2^31 rows, got scores {tuple(s.shape)}")
    return s.size // Lk if Lk else 0, Lq, Lk


def _grid(rows):
    return ((rows + WARPS - 1) // WARPS,), (WARPS * WARP,)


def causal_softmax_forward(s, scale, keep_lse=False):
    """P = softmax(S scale + M) over the last axis, in S's dtype; and lse = m + log l
    (..., Lq, 1) when keep_lse, else None."""
    cp = cupy()
    rows, Lq, Lk = _rows("causal_softmax_forward", s)
    s = cp.ascontiguousarray(s)
    acc = accumulation_dtype(s.dtype)
    p = cp.empty_like(s)
    lse = cp.empty(s.shape[:-1] + (1,), acc) if keep_lse else None
    if rows:
        _function("causal_softmax_fwd", s.dtype.name)(*_grid(rows), (
            s, np.int32(rows), np.int32(Lq), np.int32(Lk), acc.type(scale), np.bool_(False), p,
            lse if keep_lse else np.uintp(0)))
    return p, lse


def causal_softmax_recompute(s, scale, lse):
    """P = exp(S scale - lse) (0 in the future), from the scores and the forward's lse."""
    cp = cupy()
    rows, Lq, Lk = _rows("causal_softmax_recompute", s)
    acc = accumulation_dtype(s.dtype)
    if lse.shape != s.shape[:-1] + (1,) or lse.dtype != acc:
        raise ValueError(f"causal_softmax_recompute: lse must be {acc}{s.shape[:-1] + (1,)} for "
                         f"scores {tuple(s.shape)}, got {lse.dtype}{tuple(lse.shape)}")
    s, lse = cp.ascontiguousarray(s), cp.ascontiguousarray(lse)
    p = cp.empty_like(s)
    if rows:
        _function("causal_softmax_fwd", s.dtype.name)(*_grid(rows), (
            s, np.int32(rows), np.int32(Lq), np.int32(Lk), acc.type(scale), np.bool_(True), p, lse))
    return p


def causal_softmax_backward(dp, p, dout, out, scale, inplace=False):
    """dS = P (dP - D) scale with D = rowsum(dO O) (..., Lq); dp, p (..., Lq, Lk); dout, out
    (..., Lq, d). inplace: dS overwrites dp (when dp is C-contiguous)."""
    cp = cupy()
    rows, Lq, Lk = _rows("causal_softmax_backward", p)
    if dp.shape != p.shape or dout.shape != out.shape or dout.shape[:-1] != p.shape[:-1] \
            or not supports(dp, p, dout, out):
        raise ValueError(f"causal_softmax_backward: expected dp, p (..., Lq, Lk) and dout, out "
                         f"(..., Lq, d) of one dtype, got dp {dp.dtype}{tuple(dp.shape)}, p "
                         f"{p.dtype}{tuple(p.shape)}, dout {dout.dtype}{tuple(dout.shape)}, out "
                         f"{out.dtype}{tuple(out.shape)}")
    dp, p = cp.ascontiguousarray(dp), cp.ascontiguousarray(p)
    dout, out = cp.ascontiguousarray(dout), cp.ascontiguousarray(out)
    ds = dp if inplace else cp.empty_like(p)
    if rows:
        _function("causal_softmax_bwd", p.dtype.name)(*_grid(rows), (
            dp, p, dout, out, np.int32(rows), np.int32(Lk), np.int32(out.shape[-1]),
            accumulation_dtype(p.dtype).type(scale), ds))
    return ds
