"""The NumPy reference selective scan is the spec: check it against first principles."""
import numpy as np
import pytest

from tinymoe.kernels import selective_scan as ss
from tinymoe.kernels.selective_scan import reference as R

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(batch, d_inner, L, N, rng, D=True, z=True, bias=True, dtype=np.float64):
    u = rng.standard_normal((batch, d_inner, L))
    delta = rng.uniform(0.05, 0.5, (batch, d_inner, L))        # positive: valid without softplus
    A = -np.exp(rng.standard_normal((d_inner, N)))
    B = rng.standard_normal((batch, N, L))
    C = rng.standard_normal((batch, N, L))
    Dv = rng.standard_normal(d_inner) if D else None
    zv = rng.standard_normal((batch, d_inner, L)) if z else None
    bv = rng.uniform(0.0, 0.2, d_inner) if bias else None
    arrs = [u, delta, A, B, C, Dv, zv, bv]
    return [None if a is None else a.astype(dtype) for a in arrs]


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """Scalar loops over every index: the equations, nothing vectorized."""
    batch, d_inner, L = u.shape
    N = A.shape[1]
    out = np.zeros_like(u)
    for b in range(batch):
        for d in range(d_inner):
            h = np.zeros(N)
            for t in range(L):
                dt = delta[b, d, t] + (delta_bias[d] if delta_bias is not None else 0.0)
                dt = np.log1p(np.exp(dt)) if softplus else dt
                h = np.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                y = C[b, :, t] @ h + (D[d] * u[b, d, t] if D is not None else 0.0)
                out[b, d, t] = y * z[b, d, t] / (1 + np.exp(-z[b, d, t])) if z is not None else y
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 1), (1, 2, 7, 1), (3, 1, 4, 2)])
@pytest.mark.parametrize("opts", [(True, True, True, True), (False, False, False, False),
                                  (True, False, True, False), (False, True, False, True)])
def test_reference_matches_scalar_loops(shape, opts):
    D, z, bias, softplus = opts
    args = make_inputs(*shape, np.random.default_rng(1), D, z, bias)
    out = R.selective_scan_fwd(*args, softplus)
    np.testing.assert_allclose(out, naive_scan(*args, softplus), rtol=1e-12, atol=1e-12)


def finite_difference(args, softplus, dout, i, eps=1e-6):
    a = args[i]
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        fp = (R.selective_scan_fwd(*args, softplus) * dout).sum()
        a[idx] = old - eps
        fm = (R.selective_scan_fwd(*args, softplus) * dout).sum()
        a[idx] = old
        grad[idx] = (fp - fm) / (2 * eps)
    return grad


@pytest.mark.parametrize("shape,opts", [
    ((2, 2, 5, 3), (True, True, True, True)),
    ((1, 1, 1, 1), (True, True, True, False)),
    ((1, 2, 4, 2), (False, False, False, False)),
])
def test_reference_backward_matches_finite_differences(shape, opts):
    D, z, bias, softplus = opts
    rng = np.random.default_rng(2)
    args = make_inputs(*shape, rng, D, z, bias)
    dout = rng.standard_normal(args[0].shape)
    grads = R.selective_scan_bwd(dout, *args, softplus)
    for i, (name, a) in enumerate(zip(NAMES, args)):
        if a is None:
            assert grads[i] is None, name
            continue
        np.testing.assert_allclose(grads[i], finite_difference(args, softplus, dout, i),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


def test_reference_backward_across_chunk_boundaries(monkeypatch):
    """L spans several recomputation chunks: the carried gradient must cross them."""
    monkeypatch.setattr(R, "CHUNK", 3)
    rng = np.random.default_rng(3)
    args = make_inputs(1, 2, 8, 2, rng)
    dout = rng.standard_normal(args[0].shape)
    grads = R.selective_scan_bwd(dout, *args, True)
    for i in (0, 1, 2, 3):
        np.testing.assert_allclose(grads[i], finite_difference(args, True, dout, i),
                                   rtol=1e-6, atol=1e-8, err_msg=NAMES[i])


def test_state_update_steps_equal_scan():
    rng = np.random.default_rng(4)
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 6, 4, rng)
    full = R.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True)
    state = np.zeros((2, 3, 4))
    for t in range(6):
        out = ss.selective_state_update(state, u[:, :, t], delta[:, :, t], A, B[:, :, t],
                                        C[:, :, t], D, z[:, :, t], bias, True)
        np.testing.assert_allclose(out, full[:, :, t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which,value,match", [
    ("delta", np.zeros((2, 3, 4)), r"delta \(2, 3, 4\) must have the shape of u \(2, 3, 5\)"),
    ("A", np.zeros((4, 2)), r"A must be \(d_inner=3, N\), got \(4, 2\)"),
    ("A", np.zeros((3, 0)), r"d_state N must be >= 1"),
    ("B", np.zeros((2, 3, 5)), r"B must be \(batch, N, L\) = \(2, 2, 5\)"),
    ("C", np.zeros((1, 2, 5)), r"C must be \(batch, N, L\)"),
    ("D", np.zeros(4), r"D must be \(d_inner,\) = \(3,\), got \(4,\)"),
    ("z", np.zeros((2, 3, 6)), r"z \(2, 3, 6\) must have the shape of u"),
    ("delta_bias", np.zeros((3, 1)), r"delta_bias must be \(d_inner,\)"),
])
def test_bad_shapes_name_the_argument(which, value, match):
    args = dict(zip(NAMES, make_inputs(2, 3, 5, 2, np.random.default_rng(0))))
    args[which] = value
    with pytest.raises(ValueError, match=match):
        ss.selective_scan_fwd(**args)


def test_non_positive_step_is_rejected_without_softplus():
    args = dict(zip(NAMES, make_inputs(1, 2, 3, 2, np.random.default_rng(0), bias=False)))
    args["delta"][0, 1, 2] = -0.5
    with pytest.raises(ValueError, match="step delta .* must be > 0"):
        ss.selective_scan_fwd(**args)
    ss.selective_scan_fwd(**args, delta_softplus=True)  # softplus makes any delta valid


def test_unknown_impl():
    args = make_inputs(1, 1, 2, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        ss.selective_scan_fwd(*args, impl="fast")


def test_state_update_bad_shape():
    with pytest.raises(ValueError, match=r"selective_state_update: B must be \(2, 4\)"):
        ss.selective_state_update(np.zeros((2, 3, 4)), np.zeros((2, 3)), np.ones((2, 3)),
                                  np.zeros((3, 4)), np.zeros((2, 5)), np.zeros((2, 4)))
