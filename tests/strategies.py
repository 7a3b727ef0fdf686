"""Shared hypothesis strategies: small shapes with size-1 axes, broadcasting pairs."""
import numpy as np
from hypothesis import strategies as st

import tinymoe

sizes = st.sampled_from([1, 2, 3, 5])


@st.composite
def shapes(draw, min_dims=1, max_dims=3):
    n = draw(st.integers(min_dims, max_dims))
    return tuple(draw(sizes) for _ in range(n))


@st.composite
def broadcastable_pair(draw, max_dims=3):
    """Two shapes that broadcast: b drops leading axes of a and turns some into 1."""
    a = draw(shapes(1, max_dims))
    drop = draw(st.integers(0, len(a) - 1))
    b = tuple(1 if draw(st.booleans()) else n for n in a[drop:])
    return (a, b) if draw(st.booleans()) else (b, a)


def leaf(shape, low=-2.0, high=2.0, seed=0):
    """A float64 leaf tensor that requires grad, with values drawn by a fixed seed."""
    rng = np.random.default_rng(seed + 7919 * len(shape) + sum(shape))
    return tinymoe.tensor(rng.uniform(low, high, size=shape), requires_grad=True)
