"""Helpers shared by the ops: gradient reduction for broadcasting, scatter-add."""
from __future__ import annotations

from ... import backend
from ...dtypes import accumulation_dtype


def sum_to_shape(grad, shape):
    """Reduce a broadcast gradient back to `shape` (the shape of the input).

    Broadcasting copies an input along new leading axes and along its size-1 axes, so
    the gradient of the input is the sum of the output gradient over those axes.
    """
    if grad.shape == tuple(shape):
        return grad
    dtype = grad.dtype
    acc = accumulation_dtype(dtype)                      # 16-bit gradients sum in float32
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)), dtype=acc)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True, dtype=acc)
    return grad.astype(dtype, copy=False)


def shape_of(x):
    return getattr(x, "shape", ())


def scatter_add(target, index, values):
    """target[index] += values, where repeated indices accumulate (unlike `+=`)."""
    if backend.is_cupy_array(target):
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        import numpy as np

        np.add.at(target, index, values)
    return target


def normalize_axis(axis, ndim):
    """Axis (int, tuple or None) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < max(ndim, 1):
            raise IndexError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % max(ndim, 1))
    return tuple(sorted(out))


def expand_reduced(grad, shape, axis, keepdims):
    """Re-insert reduced axes so `grad` broadcasts against an input of `shape`."""
    if keepdims or axis is None and grad.ndim == 0:
        return grad
    for a in normalize_axis(axis, len(shape)):
        grad = backend.array_module(grad).expand_dims(grad, a)
    return grad


def along_axis(index, axis):
    """Fancy-index tuple that reads `a[tuple] == take_along_axis(a, index, axis)`, so
    the same tuple can also write (`a[tuple] = v`) or scatter-add."""
    xp = backend.array_module(index)
    axis = axis % index.ndim
    parts = []
    for i, n in enumerate(index.shape):
        if i == axis:
            parts.append(index)
        else:
            shape = [1] * index.ndim
            shape[i] = n
            parts.append(xp.arange(n).reshape(shape))
    return tuple(parts)
