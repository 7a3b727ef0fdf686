"""Matrix products through cuBLAS called directly (ctypes): capturable, and in 16 bits.

    c = matmul(a, b)         a (..., M, K) @ b (..., K, N) -> (..., M, N), batch axes broadcast
    c = cublas_matmul(a, b)  the same, always through this module's handle (CuPy arrays)

Two things CuPy 14 cannot do, and this module does:
- capture: CuPy refuses any cuBLAS call while a stream is being captured (its wrappers raise
  "calling cuBLAS API during stream capture is currently unsupported" before calling the
  library), although cuBLAS itself supports capture when its workspace is fixed (cuBLAS
  documentation, "CUDA Graphs Support"). So while tinymoe captures a step
  (backend.is_capturing()), every product of the autograd ops goes through this module: one
  cuBLAS handle of its own, bound to the capturing stream and to a workspace this module
  owns, and one strided-batched GEMM per product. Otherwise `matmul` is CuPy's own.
- batched 16-bit products: CuPy sends a batched bfloat16 product to an integer fallback that
  fails. cublasGemmStridedBatchedEx takes the operands' format (CUDA_R_16BF, CUDA_R_16F) and
  a compute type (CUBLAS_COMPUTE_32F: products summed in float32 on the tensor cores, the
  result rounded once to 16 bits), so every 16-bit product of tinymoe comes here
  (kernels/matmul.py), 2-D or batched, captured or not.

cuBLAS is column-major; a row-major C = A B is computed as C^T = B^T A^T, where a row-major
array read column-major *is* its transpose. `gemm_plan` works out, from shapes and strides
alone, each operand's op (N or T), leading dimension and batch stride (the CPU tests check
it by replaying the plan on NumPy memory); an operand whose layout does not fit (a non-unit
inner stride, batch axes that do not collapse to one stride) is copied contiguous first.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .. import backend

WORKSPACE_BYTES = 32 * 2**20       # cuBLAS's recommendation for Hopper
OP_N, OP_T = 0, 1
CUDA_R_16F, CUDA_R_16BF = 2, 14    # cudaDataType_t of the 16-bit operands (library_types.h)
CUBLAS_COMPUTE_32F = 68            # cublasComputeType_t: float32 products and sums
CUBLAS_GEMM_DEFAULT = -1


def _half_types():
    """{dtype: cudaDataType_t} of the 16-bit formats this module multiplies."""
    from ..dtypes import bfloat16
    types = {np.dtype(np.float16): CUDA_R_16F}
    if bfloat16 is not None:
        types[np.dtype(bfloat16)] = CUDA_R_16BF
    return types


HALF_TYPES = _half_types()


@dataclass
class Operand:
    op: int           # OP_N: the column-major view of the memory is used as is; OP_T: transposed
    ld: int           # leading dimension (elements)
    stride: int       # batch stride (elements; 0: one matrix for every batch)


def _matrix_layout(shape, strides, itemsize):
    """(op, ld) of a row-major-product operand (rows, cols), or None when it must be copied.
    Row-major (unit column stride): its column-major view is its transpose -> OP_N."""
    rows, cols = shape
    s_row, s_col = strides[0] // itemsize, strides[1] // itemsize
    if cols == 1 and rows == 1:
        return OP_N, 1
    if (s_col == 1 or cols == 1) and (rows == 1 or s_row >= cols):
        return OP_N, s_row if rows > 1 else cols
    if (s_row == 1 or rows == 1) and (cols == 1 or s_col >= rows):
        return OP_T, s_col if cols > 1 else rows
    return None                      # overlapping rows (a broadcast) or no unit stride: copy


def _batch_stride(shape, strides, itemsize):
    """One stride (elements) that walks every batch index in order, or None."""
    dims = [(n, s // itemsize) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    if all(s == 0 for _, s in dims):
        return 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def gemm_plan(a_shape, a_strides, b_shape, b_strides, itemsize):
    """The cuBLAS arguments of C = A @ B for (broadcast) operands of these shapes and strides
    (bytes): (batch shape, M, N, K, plan of A, plan of B); a plan is None where that operand
    must be copied contiguous (then its plan is the contiguous array's)."""
    if len(a_shape) == 2 and len(b_shape) == 2:          # one matrix each: no batch to work out
        la, lb = _matrix_layout(a_shape, a_strides, itemsize), _matrix_layout(b_shape, b_strides, itemsize)
        return ((), a_shape[0], b_shape[1], a_shape[1],
                la and Operand(la[0], la[1], 0), lb and Operand(lb[0], lb[1], 0))
    batch = np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    M, K = a_shape[-2:]
    N = b_shape[-1]

    def plan(shape, strides):
        nb = len(shape) - 2
        full = (0,) * (len(batch) - nb) + tuple(
            0 if n == 1 and m != 1 else s for n, m, s in zip(shape[:-2], batch[len(batch) - nb:], strides[:-2]))
        layout = _matrix_layout(shape[-2:], strides[-2:], itemsize)
        stride = _batch_stride(batch, full, itemsize)
        if layout is None or stride is None:
            return None
        return Operand(layout[0], layout[1], stride)

    return batch, M, N, K, plan(a_shape, a_strides), plan(b_shape, b_strides)


# ----------------------------------------------------------------------------- cuBLAS
class _Cublas:
    """This module's cuBLAS handle and workspace (made outside any capture, then reused)."""

    def __init__(self):
        cp = backend.cupy()
        cp.cuda.device.get_cublas_handle()                   # makes CuPy load libcublas
        path = next(line.split()[-1] for line in open("/proc/self/maps")
                    if "libcublas.so" in line and "libcublasLt" not in line)
        self.lib = ctypes.CDLL(path)
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.set_math_mode(_tf32)
        self.workspace = cp.empty(WORKSPACE_BYTES, cp.uint8)  # kept: the graph records its address
        self.stream = None
        c_ll, c_int, c_void = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
        for name, real in (("cublasSgemmStridedBatched", ctypes.c_float),
                           ("cublasDgemmStridedBatched", ctypes.c_double)):
            fn = getattr(self.lib, name)
            fn.argtypes = [c_void, c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(real),
                           c_void, c_int, c_ll, c_void, c_int, c_ll, ctypes.POINTER(real),
                           c_void, c_int, c_ll, c_int]
        self.gemm = {np.dtype(np.float32): (self.lib.cublasSgemmStridedBatched, ctypes.c_float),
                     np.dtype(np.float64): (self.lib.cublasDgemmStridedBatched, ctypes.c_double)}
        self.gemm_ex = self.lib.cublasGemmStridedBatchedEx          # 16-bit operands, float32 sums
        self.gemm_ex.argtypes = [c_void, c_int, c_int, c_int, c_int, c_int, c_void,
                                 c_void, c_int, c_int, c_ll, c_void, c_int, c_int, c_ll, c_void,
                                 c_void, c_int, c_int, c_ll, c_int, c_int, c_int]

    def set_math_mode(self, tf32: bool):
        """float32 GEMMs on TF32 tensor cores (CUBLAS_TF32_TENSOR_OP_MATH) or exact (DEFAULT)."""
        self._check(self.lib.cublasSetMathMode(self.handle, ctypes.c_int(3 if tf32 else 0)),
                    "cublasSetMathMode")

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"blas: {what} failed with cuBLAS status {status}")

    def bind(self, stream_ptr: int):
        """Use `stream_ptr`; setting a stream resets cuBLAS's workspace, so set ours again."""
        if self.stream != stream_ptr:
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)),
                        "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                       ctypes.c_size_t(WORKSPACE_BYTES)),
                        "cublasSetWorkspace")
            self.stream = stream_ptr


_cublas = None
_tf32 = False
_ONE, _ZERO = ctypes.byref(ctypes.c_float(1.0)), ctypes.byref(ctypes.c_float(0.0))   # alpha, beta


def set_tf32(enabled: bool) -> None:
    """TF32 for this module's float32 GEMMs too (tinymoe/precision/tf32.py sets both)."""
    global _tf32
    _tf32 = bool(enabled)
    if _cublas is not None:
        _cublas.set_math_mode(_tf32)


def prepare():
    """Create the handle and workspace now (before a capture: creating them allocates)."""
    global _cublas
    if _cublas is None:
        _cublas = _Cublas()
    return _cublas


def matmul(a, b):
    """a @ b. While a CUDA graph is captured, on CuPy float32/float64 arrays: cuBLAS directly."""
    if not (backend.is_cupy_array(a) and backend.is_capturing()):
        return a @ b
    return cublas_matmul(a, b)


def cublas_matmul(a, b, out=None):
    """a (..., M, K) @ b (..., K, N) with this module's cuBLAS handle (any stream state).
    `out`: written in place when it is C-contiguous of the result's shape and dtype (an
    expert's rows of a grouped product), else filled by a copy."""
    cp = backend.cupy()
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or a.dtype != b.dtype:
        y = a @ b                                            # vectors, mixed dtypes: CuPy's rules
        if out is None:
            return y
        out[...] = y
        return out
    blas = prepare()
    half = HALF_TYPES.get(a.dtype)
    if a.dtype not in blas.gemm and half is None:
        raise TypeError(f"blas.matmul: no cuBLAS GEMM for {a.dtype} (float64, float32, float16, bfloat16)")
    batch, M, N, K, pa, pb = gemm_plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    if pa is None:
        a = cp.ascontiguousarray(cp.broadcast_to(a, batch + a.shape[-2:]))
    if pb is None:
        b = cp.ascontiguousarray(cp.broadcast_to(b, batch + b.shape[-2:]))
    if pa is None or pb is None:
        batch, M, N, K, pa, pb = gemm_plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    shape = batch + (M, N)
    if out is not None and not (out.shape == shape and out.dtype == a.dtype and out.flags.c_contiguous):
        out[...] = cublas_matmul(a, b)
        return out
    c = cp.empty(shape, a.dtype) if out is None else out
    count = int(np.prod(batch)) if batch else 1
    if c.size == 0:
        return c
    if K == 0:
        c[...] = 0
        return c
    blas.bind(cp.cuda.get_current_stream().ptr)
    # C^T (N x M, column-major, ldc = N) = B^T (N x K) A^T (K x M)
    if half is not None:                      # 16-bit in and out, float32 alpha, beta and sums
        status = blas.gemm_ex(blas.handle, pb.op, pa.op, N, M, K, _ONE, b.data.ptr, half, pb.ld,
                              pb.stride, a.data.ptr, half, pa.ld, pa.stride, _ZERO, c.data.ptr,
                              half, N, M * N, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        blas._check(status, "gemm (16-bit)")
        return c
    fn, real = blas.gemm[a.dtype]
    one, zero = real(1.0), real(0.0)
    status = fn(blas.handle, pb.op, pa.op, N, M, K, ctypes.byref(one),
                ctypes.c_void_p(b.data.ptr), pb.ld, pb.stride,
                ctypes.c_void_p(a.data.ptr), pa.ld, pa.stride, ctypes.byref(zero),
                ctypes.c_void_p(c.data.ptr), N, M * N, count)
    blas._check(status, "gemm")
    return c
