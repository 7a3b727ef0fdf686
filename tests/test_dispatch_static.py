"""Static dispatch plans (C rows per expert, or T*k rows dropless, for a captured CUDA graph)
against the dynamic plan with the same capacity: the same slots kept and dropped, the same
layer output and gradients; padding rows are zeros and counted."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinymoe.kernels.dispatch import reference as ref


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), k=st.integers(1, 3), E=st.integers(1, 5), C=st.integers(1, 6),
       holes=st.booleans(), seed=st.integers(0, 2**16))
def test_static_plan_equals_the_dynamic_plan(T, k, E, C, holes, seed):
    rng = np.random.default_rng(seed)
    ei = rng.integers(0, E, (T, k))
    if holes:
        ei[rng.random((T, k)) < 0.3] = -1
    x, w, dout = rng.standard_normal((T, 3)), rng.standard_normal((T, k)), rng.standard_normal((T, 3))
    dyn = ref.make_dispatch_plan(ei, E, C)
    st_ = ref.make_static_plan(ei, E, C)
    assert st_.static and st_.num_rows == E * C and st_.bounds == tuple(range(0, E * C + 1, C))
    np.testing.assert_array_equal(st_.counts, dyn.counts)
    np.testing.assert_array_equal(st_.slot_row >= 0, dyn.slot_row >= 0)     # same slots kept
    assert int(st_.padding_rows) == E * C - int(dyn.counts.sum()) and int(dyn.padding_rows) == 0
    # expert e's kept slots are its first counts[e] rows, in the dynamic plan's order
    for e in range(E):
        n = int(st_.counts[e])
        np.testing.assert_array_equal(st_.row_slot[e * C:e * C + n], dyn.row_slot[dyn.offsets[e]:dyn.offsets[e + 1]])
        assert np.all(st_.row_slot[e * C + n:(e + 1) * C] == -1)
        assert np.all(st_.row_token[e * C + n:(e + 1) * C] == -1)
    xs = ref.permute(x, st_)
    assert np.all(xs[st_.row_token < 0] == 0)                                 # padding: zeros
    f = lambda rows: np.tanh(rows) * 2.0                                       # noqa: E731 (f(0) = 0)
    np.testing.assert_allclose(ref.combine(f(xs), w, st_), ref.combine(f(ref.permute(x, dyn)), w, dyn),
                               rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(ref.permute_backward(f(xs), st_, T),
                               ref.permute_backward(f(ref.permute(x, dyn)), dyn, T), rtol=1e-14, atol=1e-14)
    dys_s, dw_s = ref.combine_backward(dout, f(xs), w, st_)
    dys_d, dw_d = ref.combine_backward(dout, f(ref.permute(x, dyn)), w, dyn)
    np.testing.assert_allclose(dw_s, dw_d, rtol=1e-14, atol=1e-14)
    real = st_.row_slot >= 0
    assert np.all(dys_s[~real] == 0)
    np.testing.assert_allclose(dys_s[real], dys_d, rtol=1e-14, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), k=st.integers(1, 3), E=st.integers(1, 5), holes=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dropless_static_plan_is_the_dynamic_plan_with_padding_after_it(T, k, E, holes, seed):
    rng = np.random.default_rng(seed)
    ei = rng.integers(0, E, (T, k))
    if holes:
        ei[rng.random((T, k)) < 0.3] = -1
    dyn = ref.make_dispatch_plan(ei, E)
    st_ = ref.make_static_plan(ei, E, None)
    R = dyn.num_rows
    assert st_.static and st_.num_rows == T * k and st_.bounds is None and st_.capacity is None
    np.testing.assert_array_equal(st_.offsets, dyn.offsets)
    np.testing.assert_array_equal(st_.slot_row, dyn.slot_row)
    np.testing.assert_array_equal(st_.row_slot[:R], dyn.row_slot)
    assert np.all(st_.row_slot[R:] == -1) and np.all(st_.row_token[R:] == -1)
    assert int(st_.padding_rows) == int((ei < 0).sum())
    x = rng.standard_normal((T, 3))
    xs = ref.permute(x, st_)
    np.testing.assert_array_equal(xs[:R], ref.permute(x, dyn))
    assert np.all(xs[R:] == 0)


def test_static_plan_capacity_is_an_int_or_none():
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="make_static_plan: capacity must be an int >= 1 or None"):
            ref.make_static_plan(np.zeros((2, 1), np.int64), 2, bad)
    with pytest.raises(ValueError, match=r"make_static_plan: expert_index must be \(T, k\)"):
        ref.make_static_plan(np.zeros(3, np.int64), 2, 2)


def test_static_plan_drops_an_expert_index_out_of_range_as_the_kernels_do():
    ei = np.array([[0, 5], [1, 0]])
    for C in (None, 2):
        plan = ref.make_static_plan(ei, 2, C)
        assert plan.slot_row[0, 1] == -1 and int(plan.counts.sum()) == 3


def _layer_run(layer, x):
    from tinymoe.autograd import Tensor
    xt = Tensor(x, requires_grad=True)
    layer.zero_grad()
    y = layer(xt)
    (y * y).sum().backward()
    return y.data, xt.grad, [p.grad.copy() for p in layer.parameters()], layer.last_stats


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_moe_layer_with_static_dispatch_equals_the_dynamic_one(factor):
    import tinymoe
    from tinymoe.nn.moe import MoELayer
    tinymoe.manual_seed(3)
    layer = MoELayer(8, 16, num_experts=4, top_k=2, capacity_factor=factor).to(dtype="float64")
    x = np.random.default_rng(0).standard_normal((3, 5, 8))
    layer.static_dispatch = False
    y_d, dx_d, g_d, s_d = _layer_run(layer, x)
    layer.static_dispatch = True
    y_s, dx_s, g_s, s_s = _layer_run(layer, x)
    np.testing.assert_allclose(y_s, y_d, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx_s, dx_d, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_s, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    C = layer.capacity(15)
    assert s_s["tokens_per_expert"] == s_d["tokens_per_expert"]
    assert s_s["dropped_fraction"] == s_d["dropped_fraction"] and s_d["padding_fraction"] == 0
    assert s_s["padding_fraction"] == pytest.approx(1 - sum(s_s["tokens_per_expert"]) / (4 * C))


def test_dropless_moe_layer_with_static_dispatch_equals_the_dynamic_one():
    """T*k rows, the experts' bounds passed as an array (on the CPU fetched, as on a GPU in
    float32): output, gradients and statistics as with the dynamic plan; with a router that
    leaves slots empty (GShard's second choices) the padding rows after the last group are zeros."""
    import tinymoe
    from tinymoe.nn.moe import MoELayer
    padded = False
    for router in ("topk", "gshard"):
        tinymoe.manual_seed(3)
        layer = MoELayer(8, 16, num_experts=4, top_k=2, router=router, capacity_factor=None,
                         eval_capacity_factor=None).to(dtype="float64")
        x = np.random.default_rng(0).standard_normal((3, 5, 8))
        runs = {}
        for static in (False, True):
            layer.static_dispatch = static
            tinymoe.manual_seed(4)                          # GShard draws its second choices
            runs[static] = _layer_run(layer, x)
        (y_d, dx_d, g_d, s_d), (y_s, dx_s, g_s, s_s) = runs[False], runs[True]
        np.testing.assert_allclose(y_s, y_d, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dx_s, dx_d, rtol=1e-12, atol=1e-14)
        for a, b in zip(g_s, g_d):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert s_s["tokens_per_expert"] == s_d["tokens_per_expert"] and s_s["dropped_fraction"] == 0
        assert s_s["padding_fraction"] == pytest.approx(1 - sum(s_s["tokens_per_expert"]) / 30)
        padded |= s_s["padding_fraction"] > 0
    assert padded                                           # the padding rows were exercised


def test_grouped_linear_gradcheck_with_rows_of_no_expert():
    """GroupedLinear with bounds ending before the last row (a dropless static plan's padding):
    those rows map to 0 and get no gradient; float64 gradcheck."""
    from tinymoe.autograd import Tensor
    from tinymoe.autograd.gradcheck import gradcheck
    from tinymoe.nn.moe.experts import grouped_linear
    rng = np.random.default_rng(1)
    xs = Tensor(rng.standard_normal((7, 3)), requires_grad=True)
    W = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    bounds = np.array([0, 2, 5])
    y = grouped_linear(xs, W, bounds)
    assert np.all(y.data[5:] == 0)
    assert gradcheck(lambda a, b: grouped_linear(a, b, bounds), (xs, W))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,k", [((37, 8), 2), ((5, 3, 64), 5), ((1, 1), 1), ((9, 7), 7)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_kernel_equals_a_stable_sort(shape, k, largest):
    from tinymoe.backend import cupy, to_numpy
    from tinymoe.kernels.topk import topk_rows
    x = np.random.default_rng(0).integers(0, 4, shape).astype(np.float32)     # many ties
    v, i = topk_rows(cupy().asarray(x), k, largest)
    order = np.argsort(-x if largest else x, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(to_numpy(i), order)
    np.testing.assert_array_equal(to_numpy(v), np.take_along_axis(x, order, -1))


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not found")
def test_topk_cu_compiles(tmp_path):
    import subprocess

    from tinymoe.kernels import topk
    src = tmp_path / "topk.cu"
    src.write_text(topk.SOURCE.read_text() + "".join(
        f"template __global__ void topk_rows<{c}>(const {c}*, long long, int, int, bool, {c}*, long long*);\n"
        for c in ("float", "double")))
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
