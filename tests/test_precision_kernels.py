"""Every kernel in float16 and bfloat16 against its float32 reference.

A kernel gets 16-bit inputs; the reference gets the same numbers widened to float32 (exact),
so the kernel may differ only by rounding its outputs to 16 bits once (eps / 2 relative) and
by float32's summation order: the tolerance is a few eps of the format, times the output's
scale. The Numba CUDA kernels run under the simulator here (a fresh process), the CUDA C is
compiled by nvcc for both formats, and everything runs for real on a GPU (marked gpu)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe
from tinymoe import dtypes
from tinymoe.kernels import dispatch, selective_scan
from tinymoe.kernels.dispatch import reference as dispatch_ref
from tinymoe.kernels.selective_scan import reference as scan_ref

HALF = ["float16", "bfloat16"]
SCAN_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")


def close(got, want, dtype, what, k=4.0):
    got = np.asarray(tinymoe.backend.to_numpy(got), np.float64)
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= k * dtypes.eps(dtype), f"{what} ({dtype}): error {err:.2e} of the scale > {k} eps"


# ------------------------------------------------------------------ selective scan
def scan_inputs(batch, d_inner, L, N, dtype, seed=0, xp=np):
    """16-bit u, delta, B, C, z, dout; float32 A, D, delta_bias (mamba_ssm's split)."""
    rng = np.random.default_rng(seed)
    half = lambda *s: xp.asarray(rng.standard_normal(s).astype(np.float32).astype(dtype))  # noqa: E731
    f32 = lambda a: xp.asarray(a.astype(np.float32))  # noqa: E731
    u, delta, z, dout = (half(batch, d_inner, L) for _ in range(4))
    B, C = half(batch, N, L), half(batch, N, L)
    A = f32(-np.exp(rng.standard_normal((d_inner, N)) * 0.5))
    D, bias = f32(rng.standard_normal(d_inner)), f32(rng.uniform(0.01, 0.1, d_inner))
    return dout, u, delta, A, B, C, D, z, bias


def check_scan(impl_fn, shape, dtype, xp=np, **kw):
    """impl_fn(fwd or bwd args) on 16-bit inputs vs the float32 reference on their widening."""
    args = scan_inputs(*shape, dtype, xp=xp)
    wide = [np.asarray(tinymoe.backend.to_numpy(a), np.float32) for a in args]
    out, grads = impl_fn(args, **kw)
    assert out.dtype == dtypes.as_dtype(dtype)
    close(out, scan_ref.selective_scan_fwd(*wide[1:], delta_softplus=True), dtype, "out")
    want = scan_ref.selective_scan_bwd(*wide, delta_softplus=True)
    for name, g, w, x in zip(SCAN_NAMES, grads, want, args[1:]):
        assert g.dtype == x.dtype, f"{name}: a gradient has its input's dtype"
        close(g, w, dtype, name, k=8)


def dispatcher_scan(args, impl):
    dout, *inputs = args
    out, states = selective_scan.selective_scan_fwd(*inputs, delta_softplus=True, impl=impl,
                                                     return_states=True)
    grads = selective_scan.selective_scan_bwd(dout, *inputs, delta_softplus=True, impl=impl,
                                              states=states)
    return out, grads


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("impl", ["reference", "numba"])
def test_cpu_scan_takes_16_bit_inputs(impl, dtype):
    check_scan(dispatcher_scan, (2, 3, 37, 4), dtype, impl=impl)


def module_scan(args, module, config=None):
    dout, *inputs = args
    out, states = module.selective_scan_fwd(*inputs, delta_softplus=True, config=config,
                                            return_states=True)
    grads = module.selective_scan_bwd(dout, *inputs, delta_softplus=True, config=config,
                                      states=states)
    grads = [g.astype(x.dtype, copy=False) for g, x in zip(grads, inputs)]
    return out, grads


def _numba_scan_cases(dtype):
    from tinymoe.kernels.selective_scan import numba_cuda
    # two tiles of 32 steps, a chunk loop (N 3 > 2 per chunk), an idle warp (d_inner 3, 2 warps)
    check_scan(module_scan, (1, 3, 40, 3), dtype, module=numba_cuda,
               config=dict(items=1, warps=2, nchunk=2))


def _numba_dispatch_cases(dtype):
    from tinymoe.kernels.dispatch import numba_cuda
    numba_cuda.THREADS = 32
    check_dispatch(numba_cuda, (9, 2, 4, 3, 5), dtype)


def run_in_simulator(fn, *args):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t.{fn.__name__}(*{args!r})")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("dtype", HALF)
def test_numba_cuda_scan_16_bit_in_simulator(dtype):
    run_in_simulator(_numba_scan_cases, dtype)


# ------------------------------------------------------------------ dispatch / combine
def check_dispatch(module, case, dtype, xp=np):
    """permute, permute_backward, combine, combine_backward of 16-bit rows (float32 gate
    weights) vs the float32 reference."""
    T, k, E, capacity, d = case
    rng = np.random.default_rng(1)
    ei = xp.asarray(rng.integers(-1, E, (T, k)))
    x, ys_all, dout = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in
                       ((T, d), (T * k, d), (T, d)))
    w = rng.random((T, k)).astype(np.float32)
    plan = module.make_dispatch_plan(ei, E, capacity)
    ref_plan = dispatch_ref.make_dispatch_plan(tinymoe.backend.to_numpy(ei), E, capacity)
    R = ref_plan.num_rows
    ys = ys_all[:R]
    up = lambda a: a.astype(np.float32)  # noqa: E731
    dev = lambda a: xp.asarray(a)  # noqa: E731
    xs = module.permute(dev(x), plan)
    assert xs.dtype == dtypes.as_dtype(dtype)
    close(xs, dispatch_ref.permute(up(x), ref_plan), dtype, "permute", k=0)   # a copy: exact
    close(module.permute_backward(dev(ys), plan, T),
          dispatch_ref.permute_backward(up(ys), ref_plan, T), dtype, "permute_backward")
    out = module.combine(dev(ys), dev(w), plan)
    assert out.dtype == dtypes.as_dtype(dtype)              # 16-bit rows in, 16-bit rows out
    close(out, dispatch_ref.combine(up(ys), w, ref_plan), dtype, "combine")
    dys, dw = module.combine_backward(dev(dout), dev(ys), dev(w), plan)
    want_dys, want_dw = dispatch_ref.combine_backward(up(dout), up(ys), w, ref_plan)
    assert dys.dtype == dtypes.as_dtype(dtype) and dw.dtype == np.float32
    close(dys, want_dys, dtype, "dys")
    close(dw, want_dw, dtype, "dweights")


@pytest.mark.parametrize("dtype", HALF)
def test_reference_dispatch_takes_16_bit_rows(dtype):
    check_dispatch(dispatch_ref, (9, 2, 4, 3, 5), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_numba_cuda_dispatch_16_bit_in_simulator(dtype):
    run_in_simulator(_numba_dispatch_cases, dtype)


# ------------------------------------------------------------------ nvcc
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("what", ["scan_fwd", "scan_bwd", "dispatch", "norm"])
def test_cuda_c_compiles_for_16_bit_formats(what, dtype, tmp_path):
    from tinymoe.kernels import norm
    from tinymoe.kernels.dispatch import cupy_raw as dispatch_raw
    from tinymoe.kernels.selective_scan import cupy_raw as scan_raw

    source, options = {
        "scan_fwd": (scan_raw.SOURCE, scan_raw.nvcc_options(dtype, **scan_raw.FWD_CONFIG)),
        "scan_bwd": (scan_raw.SOURCE, scan_raw.nvcc_options(dtype, **scan_raw.BWD_CONFIG)),
        "dispatch": (dispatch_raw.SOURCE, dispatch_raw.nvcc_options(dtype)),
        "norm": (norm.SOURCE, norm.nvcc_options(dtype)),
    }[what]
    out = tmp_path / "k.cubin"
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings", *options,
                          "-o", str(out), str(source)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("impl", ["cupy", "numba_cuda"])
def test_gpu_scan_16_bit(impl, dtype):
    from tinymoe.kernels.selective_scan import cupy_raw, numba_cuda
    module = {"cupy": cupy_raw, "numba_cuda": numba_cuda}[impl]
    for shape in [(2, 5, 300, 16), (1, 33, 1, 4), (2, 64, 1000, 16)]:
        check_scan(module_scan, shape, dtype, xp=tinymoe.backend.cupy(), module=module)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("impl", ["cupy", "numba_cuda"])
def test_gpu_dispatch_16_bit(impl, dtype):
    from tinymoe.kernels.dispatch import cupy_raw, numba_cuda
    module = {"cupy": cupy_raw, "numba_cuda": numba_cuda}[impl]
    for case in [(9, 2, 4, 3, 5), (1000, 2, 8, 300, 130), (513, 4, 3, None, 64)]:
        check_dispatch(module, case, dtype, xp=tinymoe.backend.cupy())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows,d", [(1000, 128), (3, 4096), (4096, 7)])
def test_gpu_norm_kernels_16_bit(rows, d, dtype):
    from tinymoe.kernels import norm
    cp = tinymoe.backend.cupy()
    rng = np.random.default_rng(rows + d)
    x, dy = ((rng.standard_normal((rows, d)) * 2 + 1).astype(np.float32).astype(dtype) for _ in range(2))
    w, b = (rng.standard_normal(d).astype(np.float32).astype(dtype) for _ in range(2))
    g = [cp.asarray(a) for a in (x, w, b, dy)]
    w32 = [cp.asarray(a.astype(np.float32)) for a in (x, w, b, dy)]
    y, mean, rstd = norm.layer_norm_forward(g[0], g[1], g[2], 1e-5)
    y32, mean32, rstd32 = norm.layer_norm_forward(w32[0], w32[1], w32[2], 1e-5)
    assert y.dtype == dtypes.as_dtype(dtype) and mean.dtype == np.float32
    close(y, cp.asnumpy(y32), dtype, "layer_norm y")
    for name, a, c in zip(("dx", "dw", "db"), norm.layer_norm_backward(g[3], g[0], g[1], mean, rstd),
                          norm.layer_norm_backward(w32[3], w32[0], w32[1], mean32, rstd32)):
        close(a, cp.asnumpy(c), dtype, f"layer_norm {name}", k=8)
    y, r = norm.rms_norm_forward(g[0], g[1], 1e-5)
    y32, r32 = norm.rms_norm_forward(w32[0], w32[1], 1e-5)
    close(y, cp.asnumpy(y32), dtype, "rms_norm y")
    for name, a, c in zip(("dx", "dw"), norm.rms_norm_backward(g[3], g[0], g[1], r),
                          norm.rms_norm_backward(w32[3], w32[0], w32[1], r32)):
        close(a, cp.asnumpy(c), dtype, f"rms_norm {name}", k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "softplus"])
def test_gpu_elementwise_16_bit(name, dtype):
    from tinymoe.kernels import elementwise
    cp = tinymoe.backend.cupy()
    x = (np.random.default_rng(0).standard_normal(10_000) * 3).astype(np.float32).astype(dtype)
    g = np.random.default_rng(1).standard_normal(10_000).astype(np.float32).astype(dtype)
    fwd = {"gelu": lambda a: elementwise.gelu(a), "gelu_tanh": lambda a: elementwise.gelu(a, "tanh"),
           "silu": elementwise.silu, "softplus": elementwise.softplus}[name]
    bwd = {"gelu": lambda gr, a: elementwise.gelu_backward(gr, a),
           "gelu_tanh": lambda gr, a: elementwise.gelu_backward(gr, a, "tanh"),
           "silu": elementwise.silu_backward, "softplus": elementwise.softplus_backward}[name]
    y = fwd(cp.asarray(x))
    assert y.dtype == dtypes.as_dtype(dtype)
    close(y, cp.asnumpy(fwd(cp.asarray(x.astype(np.float32)))), dtype, name)
    close(bwd(cp.asarray(g), cp.asarray(x)),
          cp.asnumpy(bwd(cp.asarray(g.astype(np.float32)), cp.asarray(x.astype(np.float32)))),
          dtype, name + " backward")


@pytest.mark.gpu
def test_gpu_tf32_switch():
    """TF32 rounds float32 matmul inputs to 10 mantissa bits: the error of a float32 product
    against float64 grows from ~1e-7 to ~1e-4 when it is on, and back when off."""
    from tinymoe.kernels import blas
    from tinymoe.precision import set_tf32
    cp = tinymoe.backend.cupy()
    a, b = (cp.random.standard_normal((512, 512), dtype=cp.float32) for _ in range(2))
    exact = a.astype(cp.float64) @ b.astype(cp.float64)
    for mm in (lambda: a @ b, lambda: blas.cublas_matmul(a, b)):   # CuPy's, and the captured path's
        err = lambda: float(cp.abs(mm() - exact).max() / cp.abs(exact).max())  # noqa: E731
        try:
            set_tf32(True)
            on = err()
            set_tf32(False)
            off = err()
        finally:
            set_tf32(False)
        assert off < 1e-5 < on < 1e-2, (off, on)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["moe-gpt", "mamba"])
def test_gpu_training_steps_in_16_bits(model, precision):
    """A few steps of a small model on the GPU follow the float32 run's losses."""
    from tinymoe.models import build_model
    from tinymoe.optim import AdamW
    from tinymoe.precision import get_precision
    from tinymoe.step import make_step

    ids = np.random.default_rng(0).integers(0, 256, (4, 64))
    cfg = dict(n_layer=2, d_model=64) if model == "mamba" else dict(n_layer=2, d_model=64, n_head=4, d_ff=128)
    losses = {}
    for p in ("fp32", precision):
        tinymoe.manual_seed(0)
        m = build_model(model, block_size=64, **cfg).to("cuda")
        opt, prec = get_precision(p).apply(m, AdamW(m.parameters(), lr=3e-3))
        step = make_step(m, opt, grad_clip=1.0, precision=prec)
        x = tinymoe.backend.cupy().asarray(ids)
        losses[p] = [float(step(x, x).loss) for _ in range(8)]
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses[precision])) < 0.05, losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_gpu_matmul_16_bit_every_shape(dtype):
    """kernels/matmul.py on CuPy: 2-D, transposed views, (..., K) @ (K, N), out=, batched and
    broadcast batched (attention's) products against float32 on the same inputs."""
    from tinymoe.kernels.matmul import matmul
    cp = tinymoe.backend.cupy()
    rng = np.random.default_rng(0)
    h = lambda *s: cp.asarray(rng.standard_normal(s).astype(np.float32).astype(dtype))  # noqa: E731
    cases = [(h(64, 96), h(96, 80)), (h(96, 64).T, h(80, 96).T), (h(4, 33, 96), h(96, 80)),
             (h(8, 33, 96), h(8, 96, 20)), (h(2, 3, 4, 17, 16), h(2, 3, 1, 16, 17))]
    for a, b in cases:
        want = cp.asnumpy(cp.matmul(a.astype(cp.float32), b.astype(cp.float32)))
        got = matmul(a, b)
        assert got.dtype == a.dtype and got.shape == want.shape
        close(got, want, dtype, f"matmul {a.shape} @ {b.shape}")
    a, b = cases[0]
    out = cp.empty((64, 80), a.dtype)
    assert matmul(a, b, out=out) is out
    close(out, cp.asnumpy(cp.matmul(a.astype(cp.float32), b.astype(cp.float32))), dtype, "out=")
