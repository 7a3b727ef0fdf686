"""Dispatch/combine reference vs. a plain Python loop over slots, and its backward vs. finite sums."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinymoe.kernels.dispatch import (combine, combine_backward, make_dispatch_plan, permute,
                                      permute_backward)


def loop_plan(expert_index, E, capacity):
    """The spec read literally: walk slots in priority order (j-major, then t), fill experts."""
    T, k = expert_index.shape
    rows_of = [[] for _ in range(E)]
    for j in range(k):
        for t in range(T):
            e = expert_index[t, j]
            if e >= 0 and (capacity is None or len(rows_of[e]) < capacity):
                rows_of[e].append(t * k + j)
    counts = np.array([len(r) for r in rows_of])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    row_slot = np.array([s for r in rows_of for s in r], dtype=np.int64)
    slot_row = -np.ones(T * k, np.int64)
    slot_row[row_slot] = np.arange(len(row_slot))
    return counts, offsets, slot_row.reshape(T, k), row_slot // k, row_slot


def random_index(rng, T, k, E, empty_frac=0.0):
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if k <= E else \
        rng.integers(0, E, (T, k))
    idx = idx.reshape(T, k)
    idx[rng.random((T, k)) < empty_frac] = -1
    return idx


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 13), k=st.integers(1, 3), E=st.integers(1, 6),
       capacity=st.one_of(st.none(), st.integers(0, 5)), empty=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 10**6))
def test_plan_matches_loop(T, k, E, capacity, empty, seed):
    rng = np.random.default_rng(seed)
    idx = random_index(rng, T, min(k, E), E, empty)
    plan = make_dispatch_plan(idx, E, capacity)
    counts, offsets, slot_row, row_token, row_slot = loop_plan(idx, E, capacity)
    np.testing.assert_array_equal(plan.counts, counts)
    np.testing.assert_array_equal(plan.offsets, offsets)
    np.testing.assert_array_equal(plan.slot_row, slot_row)
    np.testing.assert_array_equal(plan.row_token, row_token)
    np.testing.assert_array_equal(plan.row_slot, row_slot)

    d = 3
    x = rng.standard_normal((T, d))
    w = rng.standard_normal(idx.shape)
    xs = permute(x, plan)
    np.testing.assert_array_equal(xs, x[row_token])
    ys = rng.standard_normal(xs.shape)
    out = combine(ys, w, plan)
    expect = np.zeros((T, d))
    for t in range(T):
        for j in range(idx.shape[1]):
            if slot_row[t, j] >= 0:
                expect[t] += w[t, j] * ys[slot_row[t, j]]
    np.testing.assert_allclose(out, expect, atol=1e-12)

    # Backward of linear maps, checked by <A x, g> == <x, A^T g>.
    g = rng.standard_normal(xs.shape)
    np.testing.assert_allclose((xs * g).sum(), (x * permute_backward(g, plan, T)).sum(), atol=1e-10)
    dout = rng.standard_normal((T, d))
    dys, dw = combine_backward(dout, ys, w, plan)
    np.testing.assert_allclose((out * dout).sum(), (ys * dys).sum(), atol=1e-10)
    np.testing.assert_allclose((out * dout).sum(), (w * dw).sum(), atol=1e-10)  # linear in w too


def test_priority_is_choice_major():
    # Expert 0 has capacity 2; token 2's first choice beats token 0's second choice.
    idx = np.array([[1, 0], [0, 1], [0, 1]])
    plan = make_dispatch_plan(idx, 2, capacity=2)
    np.testing.assert_array_equal(plan.counts, [2, 2])
    np.testing.assert_array_equal(plan.slot_row, [[2, -1], [0, 3], [1, -1]])


def test_degenerate_cases():
    plan = make_dispatch_plan(np.zeros((1, 1), np.int64), 4)          # one token, 3 empty experts
    np.testing.assert_array_equal(plan.counts, [1, 0, 0, 0])
    np.testing.assert_array_equal(plan.offsets, [0, 1, 1, 1, 1])
    plan = make_dispatch_plan(np.zeros((5, 1), np.int64), 2, capacity=0)  # everything dropped
    assert plan.num_rows == 0 and (plan.slot_row == -1).all()
    out = combine(np.zeros((0, 4)), np.ones((5, 1)), plan)
    np.testing.assert_array_equal(out, np.zeros((5, 4)))


def test_bad_input():
    with pytest.raises(ValueError, match=r"make_dispatch_plan: expert index 4 out of range for num_experts=4"):
        make_dispatch_plan(np.array([[4]]), 4)
    with pytest.raises(ValueError, match=r"must be \(T, k\), got shape \(3,\)"):
        make_dispatch_plan(np.array([0, 1, 2]), 4)
    with pytest.raises(TypeError, match="must be integer"):
        make_dispatch_plan(np.zeros((2, 1)), 4)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        make_dispatch_plan(np.zeros((2, 1), np.int64), 4, capacity=-1)
    with pytest.raises(ValueError, match="unknown impl 'nope'"):
        make_dispatch_plan(np.zeros((2, 1), np.int64), 4, impl="nope")
    plan = make_dispatch_plan(np.zeros((2, 1), np.int64), 4)
    with pytest.raises(ValueError, match=r"combine: weights shape \(2, 2\) != expert_index shape \(2, 1\)"):
        combine(np.zeros((2, 3)), np.ones((2, 2)), plan)
