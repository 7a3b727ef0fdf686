"""Static dispatch plans (C rows per expert, for a captured CUDA graph) against the dynamic
plan with the same capacity: the same slots kept and dropped, the same layer output and
gradients; padding rows are zeros and counted."""
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


def test_static_plan_needs_a_capacity():
    with pytest.raises(ValueError, match="make_static_plan: capacity must be an int >= 1"):
        ref.make_static_plan(np.zeros((2, 1), np.int64), 2, None)
    with pytest.raises(ValueError, match=r"make_static_plan: expert_index must be \(T, k\)"):
        ref.make_static_plan(np.zeros(3, np.int64), 2, 2)
