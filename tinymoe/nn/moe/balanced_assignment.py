"""BASE layers' balanced assignment (Lewis et al. 2021, sec. 2.2), solved exactly.

Given scores s[t, e] = h_t . w_e, find the assignment a(t) maximizing sum_t s[t, a(t)]
subject to every expert receiving the same number of tokens, T / E (or at most
ceil(T / E) when E does not divide T). Repeating every expert's column ceil(T/E)
times turns it into a rectangular linear assignment problem (each token one column,
each column at most one token), which the Hungarian-style solver of SciPy
(`linear_sum_assignment`) solves exactly. The paper uses an auction algorithm; the
optimum is the same.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment


def balanced_assignment(scores) -> np.ndarray:
    """scores (T, E) NumPy array -> (T,) int64 expert of each token; each expert gets
    at most ceil(T / E) tokens and the total score is maximal."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"balanced_assignment: scores must be (T, E), got shape {scores.shape}")
    T, E = scores.shape
    per_expert = math.ceil(T / E)
    columns = np.repeat(scores, per_expert, axis=1)      # (T, E * per_expert): column c is expert c // per_expert
    rows, cols = linear_sum_assignment(columns, maximize=True)
    expert = np.empty(T, dtype=np.int64)
    expert[rows] = cols // per_expert
    return expert


def brute_force_assignment(scores) -> tuple[float, np.ndarray]:
    """The same optimum by trying every assignment (E^T of them): for tests on tiny cases."""
    import itertools

    T, E = scores.shape
    per_expert = math.ceil(T / E)
    best, best_a = -np.inf, None
    for a in itertools.product(range(E), repeat=T):
        if max(np.bincount(a, minlength=E)) <= per_expert:
            total = scores[np.arange(T), a].sum()
            if total > best:
                best, best_a = total, np.array(a)
    return best, best_a
