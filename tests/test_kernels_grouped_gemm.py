"""The grouped expert products with device-side group bounds (tinymoe/kernels/grouped_gemm.py):
on a GPU each equals the float64 product of its 16-bit operands within the format's rounding
(sums in float32, one rounding to 16 bits) on odd groups (empty, one row, a tile +- 1, rows
after the last group), odd K and N (multiples of 8, not of the tile), unaligned views; and
GroupedLinear's device path equals its loop over experts, forward and backward. Without a
GPU: grouped_gemm.cu compiles with nvcc without spills, and bad input raises naming the op."""
import re
import shutil
import subprocess

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.dtypes import bfloat16
from tinymoe.kernels import grouped_gemm

NVCC = shutil.which("nvcc")
FORMATS = ["float16"] + (["bfloat16"] if bfloat16 is not None else [])


# the default pipeline (slices of 64, two buffers, 8 warps) and deeper rings, shorter slices,
# 4 warps: K = 8 is one slice, so a ring of 3 or 4 is never full; K = 136 is two 64-slices and
# a partial one, four 32-slices and a partial one
PIPELINES = [grouped_gemm.DEFAULT, grouped_gemm.Pipeline(bk=32, stages=4, warps=8),
             grouped_gemm.Pipeline(bk=64, stages=3, warps=4)]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("dtype", FORMATS)
def test_grouped_gemm_cu_compiles_without_spills(dtype, tmp_path):
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings", "-Xptxas", "-v",
                          *grouped_gemm.nvcc_options(dtype), "-o", str(tmp_path / "k.cubin"),
                          str(grouped_gemm.SOURCE)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    for kernel in ("grouped_rows_nn", "grouped_rows_nt", "grouped_weights"):
        report = res.stderr.split(f"Compiling entry function '{kernel}'")[1]
        assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report


def test_grouped_gemm_cu_needs_no_wmma_header():
    """CuPy compiles with NVRTC against the headers of NVIDIA's pip wheels, whose mma.h includes
    a crt/mma.h they do not ship (H100, cupy-cuda13x): the kernels use PTX mma.sync instead."""
    assert "<mma.h>" not in grouped_gemm.SOURCE.read_text().replace("No <mma.h>", "")


def test_grouped_kernels_refuse_what_they_cannot_take():
    xs, W = np.zeros((4, 8), np.float32), np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"grouped_rows: needs .* float32\(4, 8\)"):
        grouped_gemm.grouped_rows(xs, W, np.array([0, 2, 4]))
    with pytest.raises(ValueError, match=r"grouped_weights: needs"):
        grouped_gemm.grouped_weights(xs, xs, np.array([0, 2, 4]))
    assert not grouped_gemm.supports(xs, W)


# ---- on the GPU ----------------------------------------------------------------------------

def _groups(sizes, tail=0):
    """offsets (E+1,) of groups of these sizes, and R = their sum + tail rows of no group."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return offsets, int(offsets[-1]) + tail


def _data(shape, dtype, rng, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(tm.dtypes.as_dtype(dtype))


def _close(got, ref, bound, dtype):
    """|got - ref| <= eps |ref| + 2^-12 bound + half the subnormal spacing, bound = sum |a||b|,
    ref the float64 product of the same 16-bit numbers: one rounding to 16 bits (within a
    subnormal's spacing for tiny results: a one-row group's 1.3e-5 in float16) plus the float32
    sums. On an H100 these kernels' results equal cuBLAS's at every worst element checked."""
    d = tm.dtypes.as_dtype(dtype)
    err = np.abs(got.astype(np.float64) - ref)
    limit = tm.dtypes.eps(d) * np.abs(ref) + 2.0**-12 * bound + float(tm.dtypes.finfo(d).smallest_subnormal) / 2
    assert np.all(err <= limit), f"worst excess {np.max(err / limit):.3g}x the bound"


SHAPES = [  # (group sizes, tail rows, K, N)
    ([5, 0, 128, 129, 1], 3, 40, 24),
    ([300], 0, 512, 136),
    ([0, 0, 0], 7, 8, 8),
    ([127, 256, 0, 33, 128, 1, 64, 200], 0, 136, 520),
]


def test_ring_fits_two_blocks_per_multiprocessor():
    """Two blocks of the default ring share an H100/H200 multiprocessor's 227 KiB."""
    assert 2 * grouped_gemm.DEFAULT.shared_bytes() <= 227 * 1024
    assert grouped_gemm.Pipeline(bk=32, stages=4).shared_bytes() == 4 * 2 * 128 * 40 * 2
    assert grouped_gemm.Pipeline(bk=64, stages=2).shared_bytes() == 2 * 2 * 128 * 72 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: f"{p.bk}x{p.stages}x{p.warps}")
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("sizes,tail,K,N", SHAPES)
def test_grouped_products_equal_their_float64_reference(sizes, tail, K, N, dtype, pipeline):
    cp = tm.backend.cupy()
    rng = np.random.default_rng(len(sizes) * K + N)
    offsets, R = _groups(sizes, tail)
    E = len(sizes)
    xs, W, dy = _data((R, K), dtype, rng), _data((E, K, N), dtype, rng, 0.1), _data((R, N), dtype, rng)
    x64, w64, dy64 = (a.astype(np.float64) for a in (xs, W, dy))
    y_ref, dx_ref, dw_ref = np.zeros((R, N)), np.zeros((R, K)), np.zeros((E, K, N))
    y_bound, dx_bound, dw_bound = np.zeros((R, N)), np.zeros((R, K)), np.zeros((E, K, N))
    for e in range(E):
        a, b = offsets[e], offsets[e + 1]
        y_ref[a:b], y_bound[a:b] = x64[a:b] @ w64[e], np.abs(x64[a:b]) @ np.abs(w64[e])
        dx_ref[a:b], dx_bound[a:b] = dy64[a:b] @ w64[e].T, np.abs(dy64[a:b]) @ np.abs(w64[e]).T
        dw_ref[e], dw_bound[e] = x64[a:b].T @ dy64[a:b], np.abs(x64[a:b]).T @ np.abs(dy64[a:b])
    d_off = cp.asarray(offsets)
    y = grouped_gemm.grouped_rows(cp.asarray(xs), cp.asarray(W), d_off, pipeline=pipeline).get()
    dx = grouped_gemm.grouped_rows(cp.asarray(dy), cp.asarray(W), d_off, transpose=True,
                                   pipeline=pipeline).get()
    dw = grouped_gemm.grouped_weights(cp.asarray(xs), cp.asarray(dy), d_off, pipeline=pipeline).get()
    assert y.dtype == dx.dtype == dw.dtype == xs.dtype
    _close(y, y_ref, y_bound, dtype)
    _close(dx, dx_ref, dx_bound, dtype)
    _close(dw, dw_ref, dw_bound, dtype)
    assert not np.any(y[offsets[-1]:].astype(np.float32)) and not np.any(dx[offsets[-1]:].astype(np.float32))


@pytest.mark.gpu
def test_unaligned_and_strided_operands_are_copied_first():
    cp = tm.backend.cupy()
    rng = np.random.default_rng(3)
    offsets, R = _groups([10, 20])
    big = _data((R + 1, 16), "float16", rng)
    W = _data((2, 16, 8), "float16", rng)
    view = cp.asarray(big)[1:]                                  # base 32 bytes in: aligned
    odd = cp.asarray(big).reshape(-1)[1:1 + R * 16].reshape(R, 16)   # base 2 bytes in: copied
    strided = cp.asarray(np.ascontiguousarray(np.repeat(big[1:], 2, axis=1)))[:, ::2]
    expect = grouped_gemm.grouped_rows(cp.ascontiguousarray(view), cp.asarray(W), cp.asarray(offsets)).get()
    for xs in (view, strided):
        got = grouped_gemm.grouped_rows(xs, cp.asarray(W), cp.asarray(offsets)).get()
        np.testing.assert_array_equal(got.astype(np.float32), expect.astype(np.float32))
    got = grouped_gemm.grouped_rows(odd, cp.asarray(W), cp.asarray(offsets))
    assert got.shape == (R, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dropless_bf16_layer_with_device_bounds_follows_the_loop(activation):
    """The dropless MoE layer in bfloat16 on the GPU: static (T*k rows, bounds on the device,
    grouped kernels) against dynamic (bounds fetched, cuBLAS per expert); the same routing,
    so the same rows; outputs and gradients within bfloat16 rounding of each other."""
    from tinymoe.autograd import Tensor
    from tinymoe.nn.moe import MoELayer
    cp = tm.backend.cupy()
    tm.manual_seed(0)
    layer = MoELayer(64, 136, num_experts=5, top_k=2, capacity_factor=None, activation=activation,
                     aux_loss_weight=0.0, z_loss_weight=0.0).to("cuda", dtype=bfloat16)
    x = cp.asarray(np.random.default_rng(0).standard_normal((3, 77, 64)), dtype=bfloat16)
    runs = {}
    for static in (False, True):
        layer.static_dispatch = static
        layer.zero_grad()
        xt = Tensor(x, requires_grad=True)
        y = layer(xt)
        (y.astype("float32") ** 2).sum().backward()
        runs[static] = [tm.backend.to_numpy(a).astype(np.float32)
                        for a in (y.data, xt.grad, *[p.grad for p in layer.parameters()])]
    assert layer.static_dispatch is True and layer.last_stats["padding_fraction"] == 0
    for got, want in zip(runs[True], runs[False]):
        scale = np.abs(want).max() + 1e-6
        np.testing.assert_allclose(got / scale, want / scale, atol=3e-2)
