"""Expert dispatch and combine in Numba CUDA (twin of cupy_raw.py; spec in reference.py).

The plan, for S = k T slots taken in priority order s = j T + t (choice-major, then token):
1. histogram: thread c counts the experts of its chunk of consecutive slots -> hist (chunks, E)
2. offsets: counts = min(hist.sum(0), capacity); offsets = exclusive scan of counts; the
   exclusive scan of hist over chunks gives each chunk its first rank in every expert
3. rows: thread c walks its chunk in order again; a slot's rank in its expert is its
   chunk's start plus the same-expert slots before it, kept if rank < capacity
Ranks come from counting in a fixed order, never from the order in which atomics land, so
the plan (and which slots are dropped) is the same on every run.

The data movers give one block to one row (threads stride over d, coalesced):
    permute          xs[r] = x[row_token[r]]                       (scale optional)
    combine          out[t] = sum_j w[t, j] ys[slot_row[t, j]]      (j in order, no atomics)
    slot dot         dweights[t, j] = dout[t] . ys[slot_row[t, j]]  (one warp per slot)
permute_backward is combine with unit weights; combine_backward is permute scaled by the
gate plus the slot dot.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import cuda

from ...backend import array_module, to_numpy
from ...dtypes import as_dtype, is_half
from ..cuda_half import codec, kernel_view
from ..cuda_utils import WARP, at, shfl_down
from .reference import DispatchPlan, check_expert_index, check_static

CHUNK = 64  # slots per thread in the plan kernels
THREADS = 128  # threads per block of the row kernels
SLOT_WARPS = 4  # warps per block of the slot-dot kernel


@cuda.jit
def count_chunks(expert_index, hist):
    """hist[c, e] = slots of chunk c (priority order) that chose expert e."""
    c = cuda.grid(1)
    T, k = expert_index.shape
    if c >= hist.shape[0]:
        return
    for s in range(c * CHUNK, min(T * k, (c + 1) * CHUNK)):
        e = expert_index[s % T, s // T]  # slot s = j T + t
        if e >= 0:
            hist[c, e] += 1


@cuda.jit
def assign_rows(expert_index, start, counts, offsets, slot_row, row_slot):
    """Walk chunk c in priority order: rank = start[c, e]++; keep the slot if rank < counts[e]."""
    c = cuda.grid(1)
    T, k = expert_index.shape
    if c >= start.shape[0]:
        return
    for s in range(c * CHUNK, min(T * k, (c + 1) * CHUNK)):
        t = s % T
        j = s // T
        e = expert_index[t, j]
        slot_row[t, j] = -1
        if 0 <= e < counts.shape[0]:  # not empty (nor an index a static plan did not check)
            rank = start[c, e]
            start[c, e] = rank + 1
            if rank < counts[e]:
                row = offsets[e] + rank
                slot_row[t, j] = row
                row_slot[row] = t * k + j


@lru_cache(maxsize=None)
def _row_kernels(storage):
    """(permute_rows, combine_rows, slot_dot) for rows stored as `storage` (a dtype name).
    Rows are read through `ld` and written through `st` (cuda_half.codec): float32/64 as
    they are, 16-bit rows widened to float32, in which weights and sums are taken."""
    ld, st, compute = codec(as_dtype(storage))
    ZERO = compute.type(0)

    @cuda.jit
    def permute_rows(x, row_token, scale, row_slot, has_scale, out):
        """out[r] = x[row_token[r]] (* scale[row_slot[r]]): one block per row r; a padding
        row of a static plan (row_token -1) is zeros."""
        r = cuda.blockIdx.x
        src = row_token[r]
        if src < 0:
            for i in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
                out[at(r), at(i)] = st(ZERO)
            return
        w = scale[row_slot[r]] if has_scale else scale[0]  # scale is [1] when absent
        for i in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            out[at(r), at(i)] = st(ld(x[at(src), at(i)]) * w)

    @cuda.jit
    def combine_rows(ys, slot_row, weights, has_weights, out):
        """out[t] = sum_j weights[t, j] ys[slot_row[t, j]] over kept slots, j in order."""
        t = cuda.blockIdx.x
        k = slot_row.shape[1]
        for i in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            acc = ZERO
            for j in range(k):
                r = slot_row[t, j]
                if r >= 0:
                    acc += (weights[t, j] if has_weights else weights[0, 0]) * ld(ys[at(r), at(i)])
            out[at(t), at(i)] = st(acc)

    @cuda.jit
    def slot_dot(dout, ys, slot_row, dweights):
        """dweights[t, j] = dout[t] . ys[slot_row[t, j]]: one warp per slot, fixed-order sum."""
        slot = cuda.blockIdx.x * SLOT_WARPS + cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        T, k = slot_row.shape
        t = min(slot // k, T - 1)  # warps past the end compute a dummy and write nothing
        j = slot % k
        r = slot_row[t, j]
        acc = ZERO
        if r >= 0:
            for i in range(lane, dout.shape[1], WARP):
                acc += ld(dout[at(t), at(i)]) * ld(ys[at(r), at(i)])
        off = WARP // 2
        while off > 0:  # every warp reaches the shuffles (the simulator needs all threads)
            acc += shfl_down(acc, off)
            off //= 2
        if lane == 0 and slot < T * k:
            dweights[t, j] = acc

    return permute_rows, combine_rows, slot_dot


def formats(dtype):
    """(storage, compute) of rows of `dtype`: 16-bit rows stay 16-bit and are summed (and
    weighted) in float32; float32 stays float32; anything else runs in float64."""
    dtype = np.dtype(dtype)
    if is_half(dtype):
        return dtype, np.dtype(np.float32)
    dtype = dtype if dtype == np.float32 else np.dtype(np.float64)
    return dtype, dtype


# ---------------------------------------------------------------- array-level API
def make_dispatch_plan(expert_index, num_experts: int, capacity=None) -> DispatchPlan:
    xp = array_module(expert_index)
    check_expert_index(expert_index, num_experts, capacity)
    T, k = expert_index.shape
    ei = xp.ascontiguousarray(expert_index, dtype=xp.int64)
    chunks = max(1, -(-T * k // CHUNK))
    blocks = -(-chunks // THREADS)
    hist = xp.zeros((chunks, num_experts), xp.int64)  # (chunks, E)
    count_chunks[blocks, THREADS](ei, hist)
    wanted = hist.sum(axis=0)  # (E,) the histogram
    counts = wanted if capacity is None else xp.minimum(wanted, capacity)
    offsets = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(counts)])  # (E+1,)
    start = xp.cumsum(hist, axis=0) - hist  # exclusive scan over chunks: (chunks, E)
    slot_row = xp.empty((T, k), xp.int64)
    bounds = tuple(int(o) for o in to_numpy(offsets))                     # one device sync
    row_slot = xp.empty(bounds[-1], xp.int64)
    if T * k:
        assign_rows[blocks, THREADS](ei, start, counts, offsets, slot_row, row_slot)
    return DispatchPlan(counts=counts.astype(xp.int64), offsets=offsets, slot_row=slot_row,
                        row_token=row_slot // k, row_slot=row_slot,
                        num_experts=num_experts, capacity=capacity, bounds=bounds)


def make_static_plan(expert_index, num_experts: int, capacity: int | None) -> DispatchPlan:
    """C = capacity rows per expert (reference.py :: make_static_plan), from the same two
    kernels with offsets e*C; or dropless (capacity None): T*k rows, offsets the exclusive
    scan of the counts, kept on the device. Nothing is read on the host."""
    xp = array_module(expert_index)
    check_static(expert_index, num_experts, capacity)
    T, k = expert_index.shape
    E, C = num_experts, capacity
    ei = xp.ascontiguousarray(expert_index, dtype=xp.int64)
    chunks = max(1, -(-T * k // CHUNK))
    blocks = -(-chunks // THREADS)
    hist = xp.zeros((chunks, E), xp.int64)
    if T * k:
        count_chunks[blocks, THREADS](ei, hist)
    wanted = hist.sum(axis=0)                                                  # (E,)
    if C is None:                                                              # dropless
        counts = wanted
        offsets = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(counts)])   # (E+1,) on device
    else:
        counts = xp.minimum(wanted, C)                                         # (E,)
        offsets = xp.arange(E + 1, dtype=xp.int64) * C                         # (E+1,) static
    R = T * k if C is None else E * C
    start = xp.cumsum(hist, axis=0) - hist
    slot_row = xp.empty((T, k), xp.int64)
    row_slot = xp.full(R, -1, xp.int64)
    if T * k:
        assign_rows[blocks, THREADS](ei, start, counts, offsets, slot_row, row_slot)
    return DispatchPlan(counts=counts, offsets=offsets, slot_row=slot_row,
                        row_token=xp.where(row_slot >= 0, row_slot // k, -1), row_slot=row_slot,
                        num_experts=E, capacity=C,
                        bounds=None if C is None else tuple(range(0, R + 1, C)), static=True)


def _rows2d(x, op):
    if x.ndim < 1:
        raise ValueError(f"{op}: expected an array of rows, got shape {tuple(x.shape)}")
    width = int(np.prod(x.shape[1:]))
    return array_module(x).ascontiguousarray(x.reshape(x.shape[0], width))


def _permute(x, plan, scale=None):
    xp = array_module(x)
    x2 = _rows2d(x, "permute")
    storage, compute = formats(x2.dtype)
    x2 = x2.astype(storage, copy=False)
    out = xp.empty((plan.num_rows, x2.shape[1]), storage)
    if out.size:
        s = xp.ones(1, compute) if scale is None else xp.ascontiguousarray(scale.reshape(-1), compute)
        _row_kernels(storage.name)[0][plan.num_rows, THREADS](
            kernel_view(x2), plan.row_token, s, plan.row_slot, scale is not None, kernel_view(out))
    return out.reshape((plan.num_rows,) + x.shape[1:])


def _combine(ys, plan, weights, num_tokens, storage):
    xp = array_module(ys)
    compute = formats(storage)[1]
    y2 = xp.ascontiguousarray(_rows2d(ys, "combine"), storage)
    out = xp.empty((num_tokens, y2.shape[1]), storage)
    if out.size:
        w = xp.ones((1, 1), compute) if weights is None else xp.ascontiguousarray(weights, compute)
        _row_kernels(np.dtype(storage).name)[1][num_tokens, THREADS](
            kernel_view(y2), plan.slot_row, w, weights is not None, kernel_view(out))
    return out.reshape((num_tokens,) + ys.shape[1:])


def permute(x, plan: DispatchPlan):
    """x (T, d) -> xs (R, d): xs[r] = x[row_token[r]]."""
    if x.shape[0] != plan.slot_row.shape[0]:
        raise ValueError(f"permute: x has {x.shape[0]} tokens, plan has {plan.slot_row.shape[0]}")
    return _permute(x, plan)


def permute_backward(dxs, plan: DispatchPlan, num_tokens: int):
    """dxs (R, d) -> dx (T, d): dx[t] = sum of the rows of token t."""
    if plan.slot_row.shape[0] != num_tokens:
        raise ValueError(f"permute_backward: plan has {plan.slot_row.shape[0]} tokens, "
                         f"num_tokens={num_tokens}")
    return _combine(dxs, plan, None, num_tokens, formats(dxs.dtype)[0]).astype(dxs.dtype, copy=False)


def combine(ys, weights, plan: DispatchPlan):
    """ys (R, d), weights (T, k) -> out (T, d) = sum_j weights[t, j] ys[slot_row[t, j]]."""
    xp = array_module(ys)
    if weights.shape != plan.slot_row.shape:
        raise ValueError(f"combine: weights shape {tuple(weights.shape)} != expert_index shape "
                         f"{tuple(plan.slot_row.shape)}")
    if ys.shape[0] != plan.num_rows:
        raise ValueError(f"combine: ys has {ys.shape[0]} rows, plan has {plan.num_rows}")
    dtype = ys.dtype if is_half(ys.dtype) else xp.result_type(ys.dtype, weights.dtype)
    return _combine(ys, plan, weights, weights.shape[0], formats(dtype)[0]).astype(dtype, copy=False)


def combine_backward(dout, ys, weights, plan: DispatchPlan):
    """-> dys (R, d) = weights[slot] dout[token], dweights (T, k) = dout[t] . ys[slot_row]."""
    xp = array_module(dout)
    T, k = plan.slot_row.shape
    dys = _permute(dout, plan, scale=weights).astype(ys.dtype, copy=False)
    storage, compute = formats(dout.dtype)
    d2 = _rows2d(dout, "combine_backward").astype(storage, copy=False)
    y2 = xp.ascontiguousarray(_rows2d(ys, "combine_backward"), storage)
    dweights = xp.zeros((T, k), compute)
    if T * k:
        _row_kernels(storage.name)[2][-(-T * k // SLOT_WARPS), SLOT_WARPS * WARP](
            kernel_view(d2), kernel_view(y2), plan.slot_row, dweights)
    return dys, dweights.astype(weights.dtype, copy=False)

