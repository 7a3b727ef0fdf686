"""The fused LayerNorm / RMSNorm kernels (tinymoe/kernels/norm.py, CUDA C in norm.cu).

Without a GPU: norm.cu compiles with nvcc (when the machine has one) for float and double,
with no spills. On a GPU: every kernel against the NumPy autograd op it replaces (the
spec, tinymoe/autograd/ops/norm.py, run in float64 on the same rounded inputs) on odd
shapes, with and without bias, forward and backward; only the needed gradients are
computed; two runs give the same bits; the autograd ops take the kernels on CuPy arrays."""
import itertools
import re
import shutil
import subprocess

import numpy as np
import pytest

import tinymoe as tm
import tinymoe.nn.functional as F
from tinymoe import backend
from tinymoe.kernels import norm as norm_kernels

NVCC = shutil.which("nvcc")
ROWS = [1, 3, 1000]
DIMS = [1, 7, 128, 1000, 4096]
# Relative to the size of the terms each result is made of (see `_assert_close`).
TOL = {np.float32: 1e-5, np.float64: 1e-12}
KERNELS = ("layer_norm_fwd", "rms_norm_fwd", "layer_norm_bwd_dx", "rms_norm_bwd_dx",
           "norm_bwd_dwdb")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_cu_compiles_without_spills(dtype, tmp_path):
    out = tmp_path / "norm.cubin"
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-Xptxas", "-v", *norm_kernels.nvcc_options(dtype), "-o", str(out),
                          str(norm_kernels.SOURCE)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for kernel in KERNELS:
        after = res.stderr.split(f"Compiling entry function '{kernel}'")[1]
        assert int(re.search(r"(\d+) bytes spill stores", after).group(1)) == 0, res.stderr


def test_dwdb_chunks_depend_on_the_shape_alone():
    """The dw/db summation order is fixed by (rows, d): same bits on every run."""
    for rows, d in itertools.product([1, 3, 63, 64, 65, 1000, 4096, 100_000], DIMS):
        chunks, per_chunk = norm_kernels._chunks(rows, d)
        assert 1 <= chunks <= max(1, norm_kernels.TARGET_BLOCKS)
        assert (chunks - 1) * per_chunk < rows <= chunks * per_chunk     # no empty chunk
    assert norm_kernels._chunks(3, 128) == (1, 3)       # small: one chunk, no second pass


def _spec(x, w, b, dy, rms):
    """The NumPy autograd op in float64: (y, dx, dw, db) and the scales of their terms."""
    X = tm.tensor(x.astype(np.float64), requires_grad=True)
    W = tm.tensor(w.astype(np.float64), requires_grad=True)
    B = None if b is None else tm.tensor(b.astype(np.float64), requires_grad=True)
    y = F.rms_norm(X, W) if rms else F.layer_norm(X, W, B)
    y.backward(tm.tensor(dy.astype(np.float64)))
    xc = X.data if rms else X.data - X.data.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + 1e-5)
    xhat, g = xc * rstd, dy * W.data
    scales = {"y": np.abs(y.data).max() + 1e-30,
              "dx": np.abs(rstd * g).max() + np.abs(rstd * g * xhat).max() + 1e-30,
              "dw": np.abs(dy * xhat).sum(axis=0).max() + 1e-30,
              "db": np.abs(dy).sum(axis=0).max()}
    return (y.data, X.grad, W.grad, None if B is None else B.grad), scales


def _assert_close(got, want, scale, dtype, what):
    """|got - want| <= tol (|want| + scale): rounding is relative to the terms summed (a dx
    that cancels to ~0, as RMSNorm's at d = 1, is held to the size of g rstd, not to 0)."""
    got = backend.to_numpy(got)
    assert got.dtype == dtype, what
    assert np.all(np.isfinite(got)), what
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale, err_msg=what)


def _inputs(rows, d, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * 2 + 3).astype(dtype)   # a mean away from 0
    return (x, rng.standard_normal(d).astype(dtype), rng.standard_normal(d).astype(dtype),
            rng.standard_normal((rows, d)).astype(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_no_bias", "rms_norm"])
@pytest.mark.parametrize("rows,d", list(itertools.product(ROWS, DIMS)))
def test_norm_kernels_equal_the_numpy_op(rows, d, kind, dtype):
    cp = backend.cupy()
    x, w, b, dy = _inputs(rows, d, dtype, seed=rows * 10_000 + d)
    rms, b = kind == "rms_norm", (b if kind == "layer_norm" else None)
    want, scales = _spec(x, w, b, dy, rms)
    gx, gw, gb, gdy = (None if a is None else cp.asarray(a) for a in (x, w, b, dy))
    if rms:
        y, rstd = norm_kernels.rms_norm_forward(gx, gw, 1e-5)
        dx, dw = norm_kernels.rms_norm_backward(gdy, gx, gw, rstd)
        got, shapes = (y, dx, dw, None), [(rows,)]
    else:
        y, mean, rstd = norm_kernels.layer_norm_forward(gx, gw, gb, 1e-5)
        got = (y, *norm_kernels.layer_norm_backward(gdy, gx, gw, mean, rstd,
                                                    (True, True, b is not None)))
        shapes = [mean.shape]
    assert shapes[0] == rstd.shape == (rows,)                # per-row statistics, no xhat
    for name, g, c in zip(("y", "dx", "dw", "db"), got, want):
        assert (g is None) == (c is None), name
        if c is not None:
            _assert_close(g, c, scales[name], dtype, f"{kind} {name} ({rows}, {d})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,d", [(1000, 128), (4096, 7), (3, 4096), (1000, 1000)])
def test_norm_kernels_are_deterministic(rows, d, dtype):
    """dw and db come from fixed-order sums (several row chunks at these sizes): two runs
    give the same bits, for every output."""
    cp = backend.cupy()
    x, w, b, dy = (cp.asarray(a) for a in _inputs(rows, d, dtype, seed=7))
    runs = []
    for _ in range(2):
        y, mean, rstd = norm_kernels.layer_norm_forward(x, w, b, 1e-5)
        ln = norm_kernels.layer_norm_backward(dy, x, w, mean, rstd)
        ry, r = norm_kernels.rms_norm_forward(x, w, 1e-5)
        rms = norm_kernels.rms_norm_backward(dy, x, w, r)
        runs.append([cp.asnumpy(a) for a in (y, mean, rstd, *ln, ry, r, *rms)])
    for i, (a, c) in enumerate(zip(*runs)):
        assert np.array_equal(a, c), f"output {i} differs between two runs"


@pytest.mark.gpu
def test_only_the_needed_gradients_are_computed():
    cp = backend.cupy()
    x, w, b, dy = (cp.asarray(a) for a in _inputs(5, 9, np.float64, seed=3))
    _, mean, rstd = norm_kernels.layer_norm_forward(x, w, b, 1e-5)
    _, r = norm_kernels.rms_norm_forward(x, w, 1e-5)
    full = norm_kernels.layer_norm_backward(dy, x, w, mean, rstd)
    for needs in itertools.product([False, True], repeat=3):
        some = norm_kernels.layer_norm_backward(dy, x, w, mean, rstd, needs)
        for need, g, f in zip(needs, some, full):
            assert (g is not None) == need
            if need:
                assert cp.array_equal(g, f)
    assert norm_kernels.rms_norm_backward(dy, x, w, r, (False, True))[0] is None
    assert norm_kernels.rms_norm_backward(dy, x, w, r, (True, False))[1] is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_autograd_ops_use_the_kernels_on_the_gpu(dtype, monkeypatch):
    """F.layer_norm / F.rms_norm on CuPy: the fused kernels (one forward launch, two in the
    backward) on a 3-d, non-contiguous input; equal to the CPU op; a frozen weight gets no
    gradient; the error messages are the CPU's."""
    calls = []
    for name in ("layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
                 "rms_norm_backward"):
        fn = getattr(norm_kernels, name)
        monkeypatch.setattr(norm_kernels, name,
                            lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((2, 13, 3)).astype(dtype)
    w0, b0 = rng.standard_normal(13).astype(dtype), rng.standard_normal(13).astype(dtype)
    g0 = rng.standard_normal((2, 3, 13)).astype(dtype)
    results = {}
    for device in ("cpu", "cuda"):
        x = tm.tensor(x0, device=device, requires_grad=True)
        w = tm.tensor(w0, device=device, requires_grad=True)
        b = tm.tensor(b0, device=device)                         # frozen bias
        xt = x.swapaxes(1, 2)                                    # (2, 3, 13), not contiguous
        y = F.layer_norm(xt, w, b) + F.rms_norm(xt, w)
        y.backward(tm.tensor(g0, device=device))
        assert b.grad is None
        results[device] = [backend.to_numpy(a) for a in (y.data, x.grad, w.grad)]
    assert sorted(calls) == ["layer_norm_backward", "layer_norm_forward", "rms_norm_backward",
                             "rms_norm_forward"]
    for name, g, c in zip(("y", "dx", "dw"), results["cuda"], results["cpu"]):
        np.testing.assert_allclose(g, c, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10, err_msg=name)
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(4,\), expected \(13,\)"):
        F.layer_norm(tm.tensor(x0, device="cuda").swapaxes(1, 2), tm.tensor(w0[:4], device="cuda"))
