"""Aux losses: the lecture's worked values, gradchecks, BASE assignment vs brute force."""

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn.moe import (balanced_assignment, cv_squared, importance_loss, load_balancing_loss,
                            load_loss, z_loss)
from tinymoe.nn.moe.balanced_assignment import brute_force_assignment
from tinymoe.nn.moe.losses import normal_cdf


def routed(fractions, T=64):
    """probs (T, E) whose column means are `fractions`, and a top-1 index with those fractions."""
    fractions = np.asarray(fractions, dtype=np.float64)
    probs = np.tile(fractions, (T, 1))
    counts = np.round(fractions * T).astype(int)
    index = np.repeat(np.arange(len(fractions)), counts)[:, None]
    return tm.tensor(probs), index


@pytest.mark.parametrize("E", [2, 4, 8])
def test_load_balance_worked_values(E):
    """An expert with f = P = p contributes E p^2: 1/(4E) at 1/(2E), 1/E at 1/E, 4/E at 2/E."""
    for p, expect in ((1 / (2 * E), 1 / (4 * E)), (1 / E, 1 / E), (2 / E, 4 / E)):
        assert E * p * p == pytest.approx(expect)
    # A balanced router's total is exactly 1 (the minimum).
    probs, index = routed(np.full(E, 1 / E))
    assert load_balancing_loss(probs, index, E).item() == pytest.approx(1.0)
    # Contribution of one expert at p = 2/E, measured through the loss: E * f * P.
    fr = np.full(E, (1 - 2 / E) / (E - 1))
    fr[0] = 2 / E
    probs, index = routed(fr, T=E * (E - 1) * 8)  # every f_i * T is an integer
    total = load_balancing_loss(probs, index, E).item()
    rest = E * (E - 1) * fr[1] ** 2
    assert total - rest == pytest.approx(4 / E)
    # All tokens on one expert (p = 1): the formula gives E (the slide's E^2 is a slip).
    probs, index = routed(np.eye(E)[0])
    assert load_balancing_loss(probs, index, E).item() == pytest.approx(E)


def test_load_balance_ignores_empty_slots_and_checks_shape():
    probs = tm.tensor(np.full((2, 2), 0.5))
    assert load_balancing_loss(probs, np.array([[0, -1], [1, -1]]), 2).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="load_balancing_loss: probs .* must have 3 experts"):
        load_balancing_loss(probs, np.array([[0]]), 3)


def test_cv_squared_values():
    assert cv_squared(tm.tensor(np.array([2.0, 2.0, 2.0]))).item() == pytest.approx(0.0)
    # var([0, 2]) = 1, mean = 1
    assert cv_squared(tm.tensor(np.array([0.0, 2.0]))).item() == pytest.approx(1.0)
    assert cv_squared(tm.tensor(np.array([3.0]))).item() == 0.0


def test_loss_gradchecks():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((5, 3)), requires_grad=True)
    index = np.array([[0, 1], [2, 0], [1, -1], [0, 2], [2, 1]])
    tm.gradcheck(lambda z: load_balancing_loss(tm.nn.F.softmax(z, -1), index, 3), [x])
    tm.gradcheck(lambda z: importance_loss(tm.nn.F.softmax(z, -1)), [x])
    tm.gradcheck(lambda z: load_loss(normal_cdf(z)), [x])
    tm.gradcheck(z_loss, [x])
    tm.gradcheck(normal_cdf, [x])


def test_normal_cdf_values():
    v = normal_cdf(tm.tensor(np.array([0.0, 1.0, -1.96]))).numpy()
    np.testing.assert_allclose(v, [0.5, 0.8413447, 0.0249979], atol=1e-6)


@pytest.mark.parametrize("T,E", [(4, 2), (6, 3), (5, 2), (7, 3), (6, 2)])
def test_balanced_assignment_is_optimal_and_balanced(T, E):
    rng = np.random.default_rng(T * 10 + E)
    for _ in range(3):
        scores = rng.standard_normal((T, E))
        a = balanced_assignment(scores)
        assert np.bincount(a, minlength=E).max() <= -(-T // E)
        best, _ = brute_force_assignment(scores)
        assert scores[np.arange(T), a].sum() == pytest.approx(best)


def test_balanced_assignment_beats_greedy_when_all_prefer_one_expert():
    scores = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])  # everyone likes expert 0
    a = balanced_assignment(scores)
    np.testing.assert_array_equal(np.bincount(a), [2, 2])
    assert set(np.flatnonzero(a == 0)) == {0, 1}                       # the two strongest keep it
    with pytest.raises(ValueError, match=r"balanced_assignment: scores must be \(T, E\)"):
        balanced_assignment(np.zeros(3))


def test_z_loss_value_and_large_logits():
    z = np.random.default_rng(5).standard_normal((6, 4))
    lse = np.log(np.exp(z).sum(axis=1))
    assert z_loss(tm.tensor(z)).item() == pytest.approx(np.mean(lse ** 2))
    big = z_loss(tm.tensor(np.array([[1000.0, 1000.0]])))                 # no overflow
    assert big.item() == pytest.approx((1000 + np.log(2)) ** 2)

