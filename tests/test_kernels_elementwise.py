"""The fused elementwise kernels (tinymoe/kernels/elementwise.py): on a GPU each equals the
NumPy code it replaces (the same autograd op on the CPU; the AdamW step on the CPU) on odd
shapes and extreme values, in float32 and float64; the whole-array activation kernels
(activation.cu) equal the ElementwiseKernel forms bit for bit, in every dtype, on sizes that
are and are not multiples of a 16-byte pack, and unaligned or strided arrays take the
ElementwiseKernel; without a GPU, elementwise.cu and activation.cu compile with nvcc (when
the machine has one), activation.cu with no spills."""
import re
import shutil
import subprocess

import numpy as np
import pytest

import tinymoe as tm
import tinymoe.nn.functional as F
from tinymoe import backend
from tinymoe.autograd import Tensor
from tinymoe.kernels import elementwise
from tinymoe.optim import AdamW

NVCC = shutil.which("nvcc")
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
EXTREMES = [0.0, -0.0, 1e-8, -1e-8, 5.0, -5.0, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
def test_elementwise_cu_compiles_for_float_and_double(tmp_path):
    wrapper = tmp_path / "all_ops.cu"
    wrapper.write_text(elementwise.SOURCE.read_text() + """
template <typename T> __global__ void all_ops(T* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    T a = x[i], p = a, m = a, v = a * a;
    tinymoe_adamw(p, m, v, a, T(0.999), T(0.9), T(0.1), T(0.999), T(0.001), T(1e-3), T(0.03),
                  T(1e-8));
    x[i] = tinymoe_gelu(a) + tinymoe_gelu_grad(a) + tinymoe_gelu_tanh(a) +
           tinymoe_gelu_tanh_grad(a) + tinymoe_silu(a) + tinymoe_silu_grad(a) +
           tinymoe_softplus(a) + tinymoe_sigmoid(a) + p + m + v;
}
template __global__ void all_ops<float>(float*, int);
template __global__ void all_ops<double>(double*, int);
""")
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-o", str(tmp_path / "k.cubin"), str(wrapper)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


HALF_NAMES = ["float32", "float64", "float16"] + (["bfloat16"] if tm.dtypes.bfloat16 is not None else [])


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("dtype", HALF_NAMES)
@pytest.mark.parametrize("name", list(elementwise.ARRAY_KERNELS))
def test_activation_cu_compiles_without_spills(name, dtype, tmp_path):
    source = tmp_path / "activation.cu"
    source.write_text(elementwise.array_source(dtype))
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings", "-Xptxas", "-v",
                          *elementwise.array_options(name, dtype), "-o", str(tmp_path / "k.cubin"),
                          str(source)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for kernel in ("activation_forward", "activation_backward"):
        after = res.stderr.split(f"Compiling entry function '{kernel}'")[1]
        assert int(re.search(r"(\d+) bytes spill stores", after).group(1)) == 0, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_NAMES)
@pytest.mark.parametrize("name", list(elementwise.ARRAY_KERNELS))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4 * 1024 + 3, 3 * 2**20 + 5])
def test_array_activations_equal_the_elementwise_kernels(n, name, dtype):
    cp = backend.cupy()
    dt = tm.dtypes.as_dtype(dtype)
    rng = np.random.default_rng(n)
    x = cp.asarray((4 * rng.standard_normal(n)).astype(np.float32)).astype(dt)
    g = cp.asarray(rng.standard_normal(n).astype(np.float32)).astype(dt)
    fwd = {"gelu": elementwise.gelu, "gelu_tanh": lambda a: elementwise.gelu(a, "tanh"),
           "silu": elementwise.silu, "softplus": elementwise.softplus}[name]
    bwd = {"gelu": elementwise.gelu_backward,
           "gelu_tanh": lambda g, a: elementwise.gelu_backward(g, a, "tanh"),
           "silu": elementwise.silu_backward, "softplus": elementwise.softplus_backward}[name]
    assert elementwise._whole(g, x)
    y, dx = fwd(x), bwd(g, x)
    y_ref = elementwise.kernel(name, dt)(x)
    dx_ref = elementwise.kernel(name + "_backward", dt)(g, x)
    assert y.dtype == dx.dtype == dt and y.shape == dx.shape == (n,)
    for got, want in ((y, y_ref), (dx, dx_ref)):
        np.testing.assert_array_equal(got.view(cp.uint8).get(), want.view(cp.uint8).get())
    # an unaligned view and a strided one take the ElementwiseKernel, and agree
    if n > 9:
        for view in (x[1:], x[::3]):
            assert not elementwise._whole(view)
            np.testing.assert_array_equal(fwd(view).view(cp.uint8).get(),
                                          fwd(view.copy()).view(cp.uint8).get())


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "softplus": F.softplus,
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_kernels_equal_the_numpy_ops(name, dtype):
    rng = np.random.default_rng(0)
    x0 = 3 * rng.standard_normal(3 * 7 * 53)
    x0[:len(EXTREMES)] = EXTREMES
    x0 = rng.permutation(x0).reshape(3, 7, 53).astype(dtype)               # odd shape
    g0 = rng.standard_normal(x0.shape).astype(dtype)
    results = {}
    # The reference is the NumPy op in float64 on the same (rounded) inputs: in float32 the
    # NumPy tanh form itself cancels in 1 + tanh u for x < -4 (the kernel computes it as
    # x sigmoid(2u)), so float32 GPU results are held to float32 accuracy of the exact values.
    for device, dt in (("cpu", np.float64), ("cuda", dtype)):
        x = tm.tensor(x0.astype(dt), device=device, requires_grad=True)
        y = ACTIVATIONS[name](x)
        y.backward(tm.tensor(g0.astype(dt), device=device))
        assert y.dtype == dt and x.grad.dtype == dt
        results[device] = (y.numpy(), backend.to_numpy(x.grad))
    for gpu, cpu, what in zip(results["cuda"], results["cpu"], ("forward", "backward")):
        assert np.all(np.isfinite(gpu)), f"{name} {what}"
        np.testing.assert_allclose(gpu, cpu, **TOL[dtype], err_msg=f"{name} {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_equals_the_numpy_step(dtype, weight_decay):
    cp = backend.cupy()
    rng = np.random.default_rng(1)
    shapes = [(37,), (5, 129), (3, 1, 7)]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    cpu = [Tensor(p.copy(), requires_grad=True) for p in p0]
    gpu = [Tensor(cp.asarray(p), requires_grad=True) for p in p0]
    opts = [AdamW(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
            for ps in (cpu, gpu)]
    for step in range(5):
        for opt in opts:
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)                    # a schedule
        for c, g in zip(cpu, gpu):
            grad = (10.0 ** rng.uniform(-4, 1)) * rng.standard_normal(c.shape).astype(dtype)
            c.grad, g.grad = grad, cp.asarray(grad)
        for opt in opts:
            opt.step()
    for i, (c, g) in enumerate(zip(cpu, gpu)):
        np.testing.assert_allclose(cp.asnumpy(g.data), c.data, **TOL[dtype], err_msg=f"p{i}")
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(cp.asnumpy(opts[1].state[id(g)][key]),
                                       opts[0].state[id(c)][key], **TOL[dtype], err_msg=f"{key} {i}")
