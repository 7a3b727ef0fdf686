"""Expert dispatch and combine as CuPy RawKernels (CUDA C in dispatch.cu).

Same algorithm as numba_cuda.py (its docstring explains it); this file compiles
dispatch.cu once per row format and launches. Inputs and outputs are CuPy arrays; 16-bit
rows (float16, bfloat16) stay 16-bit, with float32 weights and sums (numba_cuda.formats).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ...backend import cupy
from ...dtypes import accumulation_dtype, as_dtype, is_half
from .numba_cuda import CHUNK, SLOT_WARPS, THREADS, WARP, _rows2d, formats
from .reference import DispatchPlan, check_expert_index, check_max_expert, check_static

SOURCE = Path(__file__).with_name("dispatch.cu")


CTYPES = {"float32": "float", "float64": "double", "float16": "__half",
          "bfloat16": "__nv_bfloat16"}


def nvcc_options(dtype):
    """The -D defines that specialise dispatch.cu (also used by the compile test): `dtype`
    is the rows' format; weights and sums are float32 for 16-bit rows."""
    storage = as_dtype(dtype)
    half = ("-DHALF_TYPES",) if is_half(storage) else ()
    return (f"-Ddata_t={CTYPES[storage.name]}",
            f"-Dscalar_t={CTYPES[accumulation_dtype(storage).name]}", *half,
            f"-DCHUNK={CHUNK}", f"-DSLOT_WARPS={SLOT_WARPS}")


@lru_cache(maxsize=None)
def _module(name):
    return cupy().RawModule(code=SOURCE.read_text(), options=nvcc_options(name))


def _kernel(name, dtype="float32"):
    return _module(as_dtype(dtype).name).get_function(name)


def _pack_width(d, *arrays):
    """Elements per thread in the row kernels: a 16-byte pack (dispatch.cu's PACK) when d is a
    multiple of it and every array's base is 16-byte aligned, so every row is too; else 1."""
    pack = 16 // arrays[0].itemsize
    return pack if d % pack == 0 and all(a.data.ptr % 16 == 0 for a in arrays) else 1


def _row_launch(name, storage, rows_in, out, args):
    """Launch a row kernel over out (rows, d), one thread per pack: `args` are the kernel's
    arguments before its `packed` flag and `out`; rows_in the input rows it reads."""
    rows, d = out.shape
    width = _pack_width(d, rows_in, out)
    blocks = max(1, -(-rows * (d // width) // THREADS))
    _kernel(name, storage)((blocks,), (THREADS,), (*args, np.bool_(width > 1), out))


def make_dispatch_plan(expert_index, num_experts: int, capacity=None) -> DispatchPlan:
    cp = cupy()
    check_expert_index(expert_index, num_experts, capacity, check_range=False)
    T, k = expert_index.shape
    ei = cp.ascontiguousarray(expert_index, dtype=cp.int64)
    chunks = max(1, -(-T * k // CHUNK))
    blocks = -(-chunks // THREADS)
    dims = (np.int32(T), np.int32(k), np.int32(num_experts), np.int32(chunks))
    hist = cp.zeros((chunks, num_experts), cp.int64)                       # (chunks, E)
    if T * k:
        _kernel("count_chunks")((blocks,), (THREADS,), (ei, *dims, hist))
    wanted = hist.sum(axis=0)                                               # (E,) histogram
    counts = wanted if capacity is None else cp.minimum(wanted, capacity)
    offsets = cp.concatenate([cp.zeros(1, cp.int64), cp.cumsum(counts)])   # (E+1,)
    start = cp.cumsum(hist, axis=0) - hist       # exclusive scan over chunks: first ranks
    # The plan's one device sync: the offsets (row bounds for the expert matmuls, and R to
    # size row_slot) and the largest expert index (the range check) in one transfer.
    top = ei.max(keepdims=True).reshape(1) if T * k else cp.zeros(1, cp.int64)
    host = cp.concatenate([offsets, top]).get()
    check_max_expert(int(host[-1]), num_experts)
    bounds = tuple(int(o) for o in host[:-1])
    slot_row = cp.empty((T, k), cp.int64)
    row_slot = cp.empty(bounds[-1], cp.int64)
    if T * k:
        _kernel("assign_rows")((blocks,), (THREADS,),
                               (ei, *dims, start, counts.astype(cp.int64), offsets, slot_row, row_slot))
    return DispatchPlan(counts=counts.astype(cp.int64), offsets=offsets, slot_row=slot_row,
                        row_token=row_slot // k, row_slot=row_slot,
                        num_experts=num_experts, capacity=capacity, bounds=bounds)


def make_static_plan(expert_index, num_experts: int, capacity: int | None) -> DispatchPlan:
    """C = capacity rows per expert (reference.py :: make_static_plan), from the same two
    kernels with offsets e*C; or dropless (capacity None): T*k rows, offsets the exclusive
    scan of the counts, kept on the device. Nothing is read on the host, so a CUDA graph can
    hold it."""
    cp = cupy()
    check_static(expert_index, num_experts, capacity)
    T, k = expert_index.shape
    E, C = num_experts, capacity
    ei = cp.ascontiguousarray(expert_index, dtype=cp.int64)
    chunks = max(1, -(-T * k // CHUNK))
    blocks = -(-chunks // THREADS)
    dims = (np.int32(T), np.int32(k), np.int32(E), np.int32(chunks))
    hist = cp.zeros((chunks, E), cp.int64)                                  # (chunks, E)
    if T * k:
        _kernel("count_chunks")((blocks,), (THREADS,), (ei, *dims, hist))
    wanted = hist.sum(axis=0)                                               # (E,)
    if C is None:                                                           # dropless
        counts = wanted
        offsets = cp.concatenate([cp.zeros(1, cp.int64), cp.cumsum(counts)])   # (E+1,) on device
    else:
        counts = cp.minimum(wanted, C)                                      # (E,) kept
        offsets = cp.arange(E + 1, dtype=cp.int64) * C                      # (E+1,) static
    R = T * k if C is None else E * C
    start = cp.cumsum(hist, axis=0) - hist
    slot_row = cp.empty((T, k), cp.int64)
    row_slot = cp.full(R, -1, cp.int64)
    if T * k:
        _kernel("assign_rows")((blocks,), (THREADS,),
                               (ei, *dims, start, counts, offsets, slot_row, row_slot))
    return DispatchPlan(counts=counts, offsets=offsets, slot_row=slot_row,
                        row_token=cp.where(row_slot >= 0, row_slot // k, -1), row_slot=row_slot,
                        num_experts=E, capacity=C,
                        bounds=None if C is None else tuple(range(0, R + 1, C)), static=True)


def _permute(x, plan, scale=None):
    cp = cupy()
    x2 = _rows2d(x, "permute")
    storage, compute = formats(x2.dtype)
    x2 = x2.astype(storage, copy=False)
    out = cp.empty((plan.num_rows, x2.shape[1]), storage)
    if out.size:
        s = cp.ones(1, compute) if scale is None else cp.ascontiguousarray(scale.reshape(-1), compute)
        _row_launch("permute_rows", storage, x2, out,
                    (x2, plan.row_token, s, plan.row_slot, np.bool_(scale is not None),
                     np.int64(out.shape[0]), np.int32(out.shape[1])))
    return out.reshape((plan.num_rows,) + x.shape[1:])


def _combine(ys, plan, weights, num_tokens, storage):
    cp = cupy()
    compute = accumulation_dtype(storage)
    y2 = cp.ascontiguousarray(_rows2d(ys, "combine"), storage)
    out = cp.empty((num_tokens, y2.shape[1]), storage)
    if out.size:
        w = cp.ones((1, 1), compute) if weights is None else cp.ascontiguousarray(weights, compute)
        _row_launch("combine_rows", storage, y2, out,
                    (y2, plan.slot_row, np.int32(plan.slot_row.shape[1]), w,
                     np.bool_(weights is not None), np.int64(num_tokens), np.int32(out.shape[1])))
    return out.reshape((num_tokens,) + ys.shape[1:])


def permute(x, plan: DispatchPlan):
    """x (T, d) -> xs (R, d): xs[r] = x[row_token[r]]."""
    if x.shape[0] != plan.slot_row.shape[0]:
        raise ValueError(f"permute: x has {x.shape[0]} tokens, plan has {plan.slot_row.shape[0]}")
    return _permute(x, plan).astype(x.dtype, copy=False)


def permute_backward(dxs, plan: DispatchPlan, num_tokens: int):
    """dxs (R, d) -> dx (T, d): dx[t] = sum of the rows of token t."""
    if plan.slot_row.shape[0] != num_tokens:
        raise ValueError(f"permute_backward: plan has {plan.slot_row.shape[0]} tokens, "
                         f"num_tokens={num_tokens}")
    return _combine(dxs, plan, None, num_tokens, formats(dxs.dtype)[0]).astype(dxs.dtype, copy=False)


def combine(ys, weights, plan: DispatchPlan):
    """ys (R, d), weights (T, k) -> out (T, d) = sum_j weights[t, j] ys[slot_row[t, j]]."""
    cp = cupy()
    if weights.shape != plan.slot_row.shape:
        raise ValueError(f"combine: weights shape {tuple(weights.shape)} != expert_index shape "
                         f"{tuple(plan.slot_row.shape)}")
    if ys.shape[0] != plan.num_rows:
        raise ValueError(f"combine: ys has {ys.shape[0]} rows, plan has {plan.num_rows}")
    dtype = ys.dtype if is_half(ys.dtype) else cp.result_type(ys.dtype, weights.dtype)
    return _combine(ys, plan, weights, weights.shape[0], formats(dtype)[0]).astype(dtype, copy=False)


def combine_backward(dout, ys, weights, plan: DispatchPlan):
    """-> dys (R, d) = weights[slot] dout[token], dweights (T, k) = dout[t] . ys[slot_row]."""
    cp = cupy()
    T, k = plan.slot_row.shape
    dys = _permute(dout, plan, scale=weights).astype(ys.dtype, copy=False)
    d2 = _rows2d(dout, "combine_backward")
    storage, compute = formats(d2.dtype)
    d2 = d2.astype(storage, copy=False)
    y2 = cp.ascontiguousarray(_rows2d(ys, "combine_backward"), storage)
    dweights = cp.empty((T, k), compute)
    if T * k:
        _kernel("slot_dot", storage)((-(-T * k // SLOT_WARPS),), (SLOT_WARPS * WARP,),
                                       (d2, y2, plan.slot_row, np.int32(T), np.int32(k),
                                        np.int32(d2.shape[1]),
                                        np.bool_(_pack_width(d2.shape[1], d2, y2) > 1), dweights))
    return dys, dweights.astype(weights.dtype, copy=False)
