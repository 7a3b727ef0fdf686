"""Grouped expert products with the groups' bounds on the device (grouped_gemm.cu, CuPy).

    ys = grouped_rows(xs, W, offsets)                  ys[rows of e] = xs[rows of e] @ W[e]
    dx = grouped_rows(dy, W, offsets, transpose=True)  dx[rows of e] = dy[rows of e] @ W[e]^T
    dW = grouped_weights(xs, dy, offsets)              dW[e] = xs[rows of e]^T @ dy[rows of e]

Shapes: xs (R, K), W (E, K, N) (transpose: the same W, so dy (R, N) -> dx (R, K)), dy (R, N),
offsets (E+1,) int64 on the device, rows of e = offsets[e] : offsets[e+1]; rows from
offsets[E] to R belong to no expert and come out as zeros. 16-bit operands (float16,
bfloat16) of one format, products summed in float32 on the tensor cores, rounded once.

Why: after dropless routing the group sizes are data. cuBLAS takes each group's size from
the host, so the loop over experts (nn/moe/experts.py) waits for the plan to reach the host
and then issues one launch per expert and product: the layer is bound by the host and
cannot be captured. These kernels read the offsets on the device: three launches per
GroupedLinear forward + backward, whatever E, and nothing read back.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..backend import cupy, is_cupy_array
from ..dtypes import as_dtype, is_half

SOURCE = Path(__file__).with_name("grouped_gemm.cu")
BM = BN = 128            # the tile of C one block computes (grouped_gemm.cu)
PAD = 8                  # elements that pad each shared row
CTYPES = {"float16": ("__half", "f16"), "bfloat16": ("__nv_bfloat16", "bf16")}   # C, PTX


class Pipeline(NamedTuple):
    """How a block of grouped_gemm.cu works through its tile: slices of BK along the sum, a copy
    ring STAGES buffers deep, and WARPS warps (8: each a 64 x 32 piece, 4: 64 x 64)."""
    bk: int = 64
    stages: int = 2
    warps: int = 8

    def shared_bytes(self) -> int:
        """Dynamic shared memory of one block: STAGES buffers of 2 operands, 16-bit elements."""
        stage_elems = max(BM * (self.bk + PAD), self.bk * (BN + PAD))
        return self.stages * 2 * stage_elems * 2


# bench_grouped_gemm.py --configs on an H100 (docs/kernels.md): 64x2x8, 64x3x8 and 64x3x4 within
# 1% of each other, 7-12% faster than slices of 32; 64x2x8 has the smallest ring and no spills.
DEFAULT = Pipeline()


def nvcc_options(dtype, pipeline: Pipeline = DEFAULT):
    """The -D defines that specialise grouped_gemm.cu (also used by the compile test)."""
    ctype, ptx = CTYPES[as_dtype(dtype).name]
    return (f"-Ddata_t={ctype}", f"-DMMA_TYPE={ptx}", f"-DBK={pipeline.bk}",
            f"-DSTAGES={pipeline.stages}", f"-DWARPS={pipeline.warps}")


@lru_cache(maxsize=None)
def _function(name, dtype_name, pipeline):
    module = cupy().RawModule(code=SOURCE.read_text(), options=nvcc_options(dtype_name, pipeline))
    kernel = module.get_function(name)
    kernel.max_dynamic_shared_size_bytes = pipeline.shared_bytes()   # above the static 48 KiB
    return kernel


def _launch(name, dtype, pipeline, grid, args):
    _function(name, dtype.name, pipeline)(grid, (32 * pipeline.warps,), args,
                                          shared_mem=pipeline.shared_bytes())


def supports(xs, W) -> bool:
    """True when the grouped kernels can take rows xs (R, K) and weights W (E, K, N): CuPy
    arrays of one 16-bit format, K and N multiples of 8 (rows of whole 16-byte copies)."""
    return (is_cupy_array(xs) and is_cupy_array(W) and xs.dtype == W.dtype and is_half(xs.dtype)
            and xs.ndim == 2 and W.ndim == 3 and W.shape[1] % 8 == 0 and W.shape[2] % 8 == 0)


def _operand(a):
    """C-contiguous with a 16-byte aligned base (the kernels' 16-byte copies); copied if not."""
    if not a.flags.c_contiguous or a.data.ptr % 16:
        a = a.copy(order="C")                    # a new allocation: 256-byte aligned
    return a


def _check(op, xs, W, offsets, k_axis):
    if not supports(xs, W):
        raise ValueError(f"{op}: needs CuPy float16/bfloat16 rows (R, K) and weights (E, K, N) of "
                         f"one format, K and N multiples of 8; got {xs.dtype}{tuple(xs.shape)}, "
                         f"{W.dtype}{tuple(W.shape)}")
    if xs.shape[1] != W.shape[k_axis]:
        raise ValueError(f"{op}: rows {tuple(xs.shape)} do not match weights {tuple(W.shape)}")
    if offsets.shape != (W.shape[0] + 1,) or offsets.dtype != np.int64:
        raise ValueError(f"{op}: offsets must be int64 ({W.shape[0] + 1},), got "
                         f"{offsets.dtype}{tuple(offsets.shape)}")


def grouped_rows(xs, W, offsets, transpose: bool = False, pipeline: Pipeline = DEFAULT):
    """xs (R, K) @ W[e] (or W[e]^T with transpose: W (E, N, K)) per group -> (R, N)."""
    op = "grouped_rows"
    _check(op, xs, W, offsets, 2 if transpose else 1)
    cp = cupy()
    xs, W, offsets = _operand(xs), _operand(W), cp.ascontiguousarray(offsets)
    E, R, K = W.shape[0], xs.shape[0], xs.shape[1]
    N = W.shape[1] if transpose else W.shape[2]
    out = cp.empty((R, N), xs.dtype)
    if out.size == 0:
        return out
    if K == 0:
        out.fill(0)
        return out
    # x: column tiles; y: row tiles, sum_e ceil(n_e / BM) + ceil(tail / BM) <= ceil(R / BM) + E + 1
    grid = (-(-N // BN), -(-R // BM) + E + 1)
    _launch("grouped_rows_nt" if transpose else "grouped_rows_nn", xs.dtype, pipeline, grid,
            (xs, W, offsets, out, np.int32(E), np.int64(R), np.int32(K), np.int32(N)))
    return out


def grouped_weights(xs, dy, offsets, pipeline: Pipeline = DEFAULT):
    """xs (R, M), dy (R, N) -> (E, M, N): xs[rows of e]^T @ dy[rows of e] (0 for an empty group).
    E is len(offsets) - 1."""
    op = "grouped_weights"
    if not (is_cupy_array(xs) and is_cupy_array(dy) and xs.dtype == dy.dtype and is_half(xs.dtype)
            and xs.ndim == dy.ndim == 2 and xs.shape[0] == dy.shape[0]
            and xs.shape[1] % 8 == 0 and dy.shape[1] % 8 == 0):
        raise ValueError(f"{op}: needs CuPy float16/bfloat16 xs (R, M) and dy (R, N) of one format, "
                         f"M and N multiples of 8; got {xs.dtype}{tuple(xs.shape)}, "
                         f"{dy.dtype}{tuple(dy.shape)}")
    if offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.shape[0] < 2:
        raise ValueError(f"{op}: offsets must be int64 (E+1,), got {offsets.dtype}{tuple(offsets.shape)}")
    cp, E = cupy(), offsets.shape[0] - 1
    xs, dy, offsets = _operand(xs), _operand(dy), cp.ascontiguousarray(offsets)
    M, N = xs.shape[1], dy.shape[1]
    out = cp.empty((E, M, N), xs.dtype)
    if out.size:
        _launch("grouped_weights", xs.dtype, pipeline, (-(-N // BN), -(-M // BM), E),
                (xs, dy, offsets, out, np.int32(M), np.int32(N)))
    return out
