"""kernels/blas.py's GEMM plan (op, leading dimension, batch stride of each operand, from
shapes and strides alone), replayed here on NumPy memory the way cuBLAS reads it
(column-major), against np.matmul: transposed views, broadcast batch axes, size-1 axes."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from tinymoe.kernels.blas import OP_N, gemm_plan


def column_major(buf, base, rows, cols, ld, itemsize):
    """The (rows, cols) column-major matrix at element `base` of buf with leading dim ld."""
    return as_strided(buf[base:], shape=(rows, cols), strides=(itemsize, ld * itemsize))


def emulate(a, b):
    """C = A @ B the way cublas_matmul asks cuBLAS for it: C^T = op(B') op(A')."""
    batch, M, N, K, pa, pb = gemm_plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    if pa is None:
        a = np.ascontiguousarray(np.broadcast_to(a, batch + a.shape[-2:]))
    if pb is None:
        b = np.ascontiguousarray(np.broadcast_to(b, batch + b.shape[-2:]))
    batch, M, N, K, pa, pb = gemm_plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    count = int(np.prod(batch)) if batch else 1
    it = a.itemsize
    abuf = (a.base if a.base is not None else a).reshape(-1)   # the memory each operand views
    bflat = (b.base if b.base is not None else b).reshape(-1)
    a0 = (a.__array_interface__["data"][0] - abuf.__array_interface__["data"][0]) // it
    b0 = (b.__array_interface__["data"][0] - bflat.__array_interface__["data"][0]) // it
    c = np.empty((count, M, N))
    for i in range(count):
        Bv = column_major(bflat, b0 + i * pb.stride, *((N, K) if pb.op == OP_N else (K, N)), pb.ld, it)
        Av = column_major(abuf, a0 + i * pa.stride, *((K, M) if pa.op == OP_N else (M, K)), pa.ld, it)
        opB = Bv if pb.op == OP_N else Bv.T                       # (N, K) = B^T
        opA = Av if pa.op == OP_N else Av.T                       # (K, M) = A^T
        c[i] = (opB @ opA).T                                      # C = (B^T A^T)^T
    return c.reshape(batch + (M, N))


CASES = [
    lambda r: (r((5, 3)), r((3, 4))),                             # plain
    lambda r: (r((3, 5)).T, r((3, 4))),                           # A transposed view
    lambda r: (r((5, 3)), r((4, 3)).T),                           # B transposed view (x @ W.T)
    lambda r: (r((2, 6, 5, 3)), r((3, 4))),                       # batch @ matrix (linear)
    lambda r: (r((2, 3, 5, 3)), r((2, 3, 4, 3)).swapaxes(-1, -2)),  # q @ k^T
    lambda r: (r((2, 1, 5, 3)), r((1, 3, 3, 4))),                 # both broadcast
    lambda r: (r((2, 3, 4, 5, 3)), r((2, 3, 1, 6, 3)).swapaxes(-1, -2)),  # GQA: k broadcast over G
    lambda r: (r((4, 7, 3))[:, ::2], r((4, 3, 2))),               # strided rows
    lambda r: (r((1, 3)), r((3, 1))),                             # 1 x 1 result
    lambda r: (r((3, 2, 5)).swapaxes(1, 2), r((3, 2, 4))),        # experts' x^T @ g
    lambda r: (np.broadcast_to(r((1, 3)), (4, 3)), r((3, 2))),    # rows overlap: copied
    lambda r: (r((5, 1)), r((1, 4))),                             # outer product
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemm_plan_replays_to_matmul(case):
    rng = np.random.default_rng(case)
    a, b = CASES[case](lambda s: rng.standard_normal(s))
    np.testing.assert_allclose(emulate(a, b), np.matmul(a, b), rtol=1e-12, atol=1e-12)
