"""Every CPU selective-scan kernel equals the NumPy reference, forward and backward."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinymoe.kernels import selective_scan as ss
from tinymoe.kernels.selective_scan import assoc, numba_cpu, reference

from test_scan_reference import make_inputs

IMPLS = ["assoc", "numba"]


def check_against_reference(impl, shape, D, z, bias, softplus, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    args = make_inputs(*shape, rng, D, z, bias, dtype)
    dout = rng.standard_normal(args[0].shape).astype(dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    out = ss.selective_scan_fwd(*args, delta_softplus=softplus, impl=impl)
    assert out.dtype == dtype and out.shape == args[0].shape
    np.testing.assert_allclose(out, reference.selective_scan_fwd(*args, softplus), **tol)
    grads = ss.selective_scan_bwd(dout, *args, delta_softplus=softplus, impl=impl)
    want = reference.selective_scan_bwd(dout, *args, softplus)
    for name, g, w in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"],
                          grads, want):
        if w is None:
            assert g is None, name
        else:
            assert g.shape == w.shape, name
            np.testing.assert_allclose(g, w, err_msg=f"{impl} {name}", **tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 5), (1, 2, 67, 1), (3, 5, 130, 3)])
@pytest.mark.parametrize("opts", [(True, True, True, True), (False, False, False, False),
                                  (True, False, False, True), (False, True, True, False)])
def test_impl_matches_reference(impl, shape, opts):
    check_against_reference(impl, shape, *opts)


@pytest.mark.parametrize("impl", IMPLS)
def test_impl_float32(impl):
    check_against_reference(impl, (2, 3, 33, 4), True, True, True, True, dtype=np.float32)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), d_inner=st.integers(1, 4), L=st.integers(1, 70),
       N=st.integers(1, 5), flags=st.tuples(*[st.booleans()] * 4), seed=st.integers(0, 99))
def test_numba_matches_reference_hypothesis(batch, d_inner, L, N, flags, seed):
    check_against_reference("numba", (batch, d_inner, L, N), *flags, seed=seed)


def test_numba_backward_across_many_chunks(monkeypatch):
    """Several recomputation chunks, and more channel groups than threads would give."""
    monkeypatch.setattr(numba_cpu.numba, "get_num_threads", lambda: 3)
    check_against_reference("numba", (2, 5, 3 * numba_cpu.CHUNK + 5, 2), True, True, True, True)


def test_assoc_scan_is_the_recurrence():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (2, 3, 37, 2)), rng.standard_normal((2, 3, 37, 2))
    h, want = np.zeros((2, 3, 2)), np.empty_like(b)
    for t in range(37):
        h = a[:, :, t] * h + b[:, :, t]
        want[:, :, t] = h
    np.testing.assert_allclose(assoc.associative_scan(a, b), want, rtol=1e-12)


def test_default_impl_on_cpu_is_numba():
    assert ss._impl(None, np.zeros((1, 1, 1))) is numba_cpu
