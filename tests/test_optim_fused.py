"""The fused AdamW (flat buffers, device-side lr / step count / found_inf) and the device
clip: on the CPU the fused path equals the per-tensor AdamW bit for bit; on a GPU the
kernels equal the NumPy path to float32 rounding."""
import json

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import backend
from tinymoe.autograd import Tensor
from tinymoe.optim import AdamW, clip_grad_norm_, grad_norm, scale_grads_
from tinymoe.optim.flat import FlatParams, flat_of


def make_params(dtype=np.float32, device="cpu", seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(3, 5), (7,), (2, 3, 4), (1,), (11, 2)]                 # odd sizes
    return [Tensor(backend.to_device(rng.standard_normal(s).astype(dtype), device), requires_grad=True)
            for s in shapes]


def grads_for(params, step, scale=1.0):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(p.shape).astype(p.dtype) * scale for p in params]


def groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0, "lr": 0.02}]


def run(fused, steps=6, found_inf_at=(), dtype=np.float32, device="cpu", lrs=None):
    params = make_params(dtype, device)
    opt = AdamW(groups(params), lr=0.01, betas=(0.8, 0.95), eps=1e-6, fused=fused)
    xp = backend.module_for(device)
    for t in range(steps):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        for p, g in zip(params, grads_for(params, t)):
            p.grad = backend.to_device(g, device)
        flag = xp.asarray(t in found_inf_at)
        opt.step(found_inf=flag if found_inf_at else None)
    return params, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_equals_per_tensor_bit_for_bit_on_the_cpu(dtype):
    lrs = [0.01, 0.02, 0.015, 0.001, 0.03, 0.02]                      # the schedule changes lr
    a, _ = run(False, dtype=dtype, lrs=lrs)
    b, opt = run(True, dtype=dtype, lrs=lrs)
    for p, q in zip(a, b):
        assert p.data.dtype == q.data.dtype == dtype
        np.testing.assert_array_equal(p.data, q.data)
    assert int(opt._flat.t) == 6


def test_fused_adamw_parameters_are_views_of_one_flat_buffer():
    params = make_params()
    opt = AdamW(params, fused=True)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    flat = opt._flat.flat
    assert all(np.shares_memory(p.data, flat.data) for p in params)
    assert all(p.grad is buf for p, buf in zip(params, flat.grad_views))
    assert flat_of(params) is flat


def test_found_inf_skips_the_whole_step_including_the_step_count():
    skipped, opt = run(True, steps=6, found_inf_at=(2, 4))
    # equal only if steps 2 and 4 changed nothing and t did not advance: a run fed the 4
    # other gradients in order
    params = make_params()
    ref = AdamW(groups(params), lr=0.01, betas=(0.8, 0.95), eps=1e-6, fused=False)
    for t in (0, 1, 3, 5):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        ref.step()
    for p, q in zip(params, skipped):
        np.testing.assert_array_equal(p.data, q.data)
    assert int(opt._flat.t) == 4


def test_per_tensor_adamw_also_honours_found_inf():
    params = make_params()
    before = [p.data.copy() for p in params]
    opt = AdamW(params, fused=False)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step(found_inf=np.asarray(True))
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.data, b)
    assert opt.state == {}


def test_fused_state_dict_loads_into_per_tensor_and_back():
    params, opt = run(True, steps=3)
    arrays, meta = opt.state_dict()
    meta = json.loads(json.dumps(meta))
    assert meta["scalars"]["0"]["step"] == 3
    copy_a = [Tensor(p.data.copy(), requires_grad=True) for p in params]
    copy_b = [Tensor(p.data.copy(), requires_grad=True) for p in params]
    per_tensor = AdamW(groups(copy_a), lr=0.01, betas=(0.8, 0.95), eps=1e-6, fused=False)
    fused = AdamW(groups(copy_b), lr=0.01, betas=(0.8, 0.95), eps=1e-6, fused=True)
    per_tensor.load_state_dict(arrays, meta)
    fused.load_state_dict(arrays, meta)
    for t in (3, 4):
        for ps in (copy_a, copy_b):
            for p, g in zip(ps, grads_for(ps, t)):
                p.grad = g
        per_tensor.step()
        fused.step()
    for p, q in zip(copy_a, copy_b):
        np.testing.assert_array_equal(p.data, q.data)


def test_fused_adamw_follows_replaced_parameter_data():
    params = make_params()
    opt = AdamW(params, fused=True)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    params[1].data = np.full(params[1].shape, 2.0, np.float32)      # e.g. load_state_dict
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    opt.step()
    assert np.shares_memory(params[1].data, opt._flat.flat.data)
    assert np.all(np.abs(params[1].data - 2.0) < 0.1)


def test_fused_adamw_leaves_a_parameter_without_gradient_alone():
    params = make_params()
    opt = AdamW(params, lr=0.1, fused=True)
    before = params[2].data.copy()
    for i, (p, g) in enumerate(zip(params, grads_for(params, 0))):
        p.grad = None if i == 2 else g
    opt.step()
    np.testing.assert_array_equal(params[2].data, before)
    assert not np.array_equal(params[1].data, make_params()[1].data)


def test_the_engine_writes_gradients_into_the_flat_buffer():
    w = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    opt = AdamW([w], fused=True)
    w.grad = np.zeros((2, 3), np.float32)
    opt.step()
    buf = w.grad_buffer
    w.grad = None
    (tm.tensor(np.arange(6, dtype=np.float32).reshape(2, 3)) * w).sum().backward()
    assert w.grad is buf
    np.testing.assert_array_equal(buf, np.arange(6).reshape(2, 3))


# ----------------------------------------------------------------------- clipping
def test_grad_norm_and_scale_on_the_flat_buffer_equal_clip_grad_norm():
    a = make_params()
    for p, g in zip(a, grads_for(a, 0, scale=0.3)):
        p.grad = g
    b = make_params()
    opt = AdamW(b, fused=True)
    for p, g in zip(b, grads_for(b, 0, scale=0.3)):
        p.grad = g
    opt._fused_state().flat.gradients_present()                      # grads into the flat buffer
    assert flat_of(b) is opt._flat.flat
    norm = grad_norm(b)
    ref = clip_grad_norm_(a, 0.5)
    np.testing.assert_allclose(float(norm), ref, rtol=1e-6)
    scale_grads_(b, norm, 0.5)
    for p, q in zip(a, b):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-6, atol=0)


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not found")
def test_optim_cu_compiles(tmp_path):
    import subprocess

    from tinymoe.kernels import optim
    src = tmp_path / "optim.cu"
    src.write_text(optim.SOURCE.read_text() + """
template __global__ void sumsq_partials<float>(const float*, long long, double*);
template __global__ void sumsq_partials<double>(const double*, long long, double*);
""")
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_flat_params_refuses_mixed_dtypes():
    a = Tensor(np.ones(2, np.float32), requires_grad=True)
    b = Tensor(np.ones(2, np.float64), requires_grad=True)
    with pytest.raises(ValueError, match="one dtype"):
        FlatParams([[a, b]])


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_kernels_equal_the_numpy_path(dtype):
    lrs = [0.01, 0.02, 0.015, 0.001, 0.03, 0.02]
    cpu, _ = run(True, dtype=dtype, lrs=lrs, found_inf_at=(2,))
    gpu, opt = run(True, dtype=dtype, device="cuda", lrs=lrs, found_inf_at=(2,))
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    for p, q in zip(cpu, gpu):
        np.testing.assert_allclose(backend.to_numpy(q.data), p.data, **tol)
    assert int(opt._flat.t) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_flat_norm_and_clip_kernels_equal_the_numpy_path(max_norm):
    a, b = make_params(), make_params(device="cuda")
    opt = AdamW(b, fused=True)
    for p, q, g in zip(a, b, grads_for(a, 0)):
        p.grad, q.grad = g, backend.to_device(g, "cuda")
    opt._fused_state().flat.gradients_present()
    assert flat_of(b) is opt._flat.flat                              # the kernels' path
    n_cpu, n_gpu = grad_norm(a), grad_norm(b)
    assert n_gpu.dtype == np.float64 and n_gpu.shape == ()
    np.testing.assert_allclose(float(n_gpu), float(n_cpu), rtol=1e-6)
    scale_grads_(a, n_cpu, max_norm)
    scale_grads_(b, n_gpu, max_norm)
    for p, q in zip(a, b):
        np.testing.assert_allclose(backend.to_numpy(q.grad), p.grad, rtol=1e-6)
