"""The float32 CPU GELU kernel (tinymoe/kernels/gelu_cpu.py) against its float64 spec."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf as erf64

import tinymoe
from tinymoe.kernels import gelu_cpu
from tinymoe.nn import functional as F


def gelu64(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + erf64(x / math.sqrt(2)))


def gelu_grad64(g, x):
    g, x = g.astype(np.float64), x.astype(np.float64)
    return g * (0.5 * (1 + erf64(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def test_erf_within_one_float32_ulp_of_scipy():
    x = np.linspace(-6, 6, 400_001, dtype=np.float32)
    err = np.abs(gelu_cpu.erf(x).astype(np.float64) - erf64(x.astype(np.float64)))
    assert err.max() < 6e-8                         # half an ulp of float32 just below 1
    tiny = np.geomspace(1e-30, 1e-2, 2000).astype(np.float32)
    rel = np.abs(gelu_cpu.erf(tiny) / erf64(tiny.astype(np.float64)) - 1)
    assert rel.max() < 2.5e-7                       # about 2 ulp near 0, where erf(x) ~ 1.128 x


def test_erf_edge_values():
    with np.errstate(invalid="ignore"):
        got = gelu_cpu.erf(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.92, 50.0, -1e30], np.float32))
    np.testing.assert_array_equal(got[:4], [0, 0, 1, -1])
    assert np.isnan(got[4])
    np.testing.assert_array_equal(got[5:], [1, 1, -1])


def test_coefficients_come_from_the_documented_fit():
    """The fit (SciPy's least_squares at its tightest tolerances) lands within a few parts per
    million of the shipped coefficients, the last digits depending on the SciPy and BLAS
    versions (4e-6 apart seen between two); what matters is that both fit erf equally well."""
    P, Q = gelu_cpu.fit_erf_coefficients()
    np.testing.assert_allclose(P, gelu_cpu.ERF_P, rtol=1e-4)
    np.testing.assert_allclose(Q, gelu_cpu.ERF_Q, rtol=1e-4)
    x = np.linspace(0.0, gelu_cpu.ERF_CLAMP, 20001)
    t = x * x

    def max_error(p, q):
        return np.abs(x * np.polyval(p, t) / np.polyval(q, t) - erf64(x)).max()

    assert max_error(P, Q) == pytest.approx(max_error(gelu_cpu.ERF_P, gelu_cpu.ERF_Q), rel=1e-3)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 37), min_size=1, max_size=3), scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_gelu_forward_and_backward_match_float64_on_odd_shapes(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(gelu_cpu.gelu(x), gelu64(x), rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(gelu_cpu.gelu_backward(g, x), gelu_grad64(g, x), rtol=2e-6, atol=2e-7)


def test_gelu_on_non_contiguous_views_and_empty_arrays():
    x = np.random.default_rng(0).standard_normal((6, 9)).astype(np.float32)
    view = x[::2, 1::3].T                           # strided, transposed
    np.testing.assert_allclose(gelu_cpu.gelu(view), gelu64(view), rtol=2e-6, atol=2e-7)
    assert gelu_cpu.gelu(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_the_op_uses_the_kernel_for_float32_and_the_spec_for_float64():
    x32 = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    t = tinymoe.tensor(x32, requires_grad=True)
    y = F.gelu(t)
    np.testing.assert_array_equal(y.data, gelu_cpu.gelu(x32))
    assert y.dtype == np.float32
    y.backward(np.ones_like(x32))
    np.testing.assert_array_equal(t.grad, gelu_cpu.gelu_backward(np.ones_like(x32), x32))
    t64 = tinymoe.tensor(x32.astype(np.float64))
    np.testing.assert_array_equal(F.gelu(t64).data, gelu64(x32))
    assert tinymoe.autograd.gradcheck(F.gelu, [tinymoe.tensor(x32.astype(np.float64), requires_grad=True)])
