"""Making tensors: tinymoe.tensor, zeros, ones, randn, rand, arange, ..."""
from __future__ import annotations

import numpy as np

from . import backend
from .autograd.tensor import Tensor


def tensor(data, requires_grad: bool = False, device=None, dtype=None) -> Tensor:
    """A new leaf tensor. Python floats become float32; arrays keep their dtype."""
    return Tensor(data, requires_grad=requires_grad, device=device, dtype=dtype)


def _dtype(dtype):
    return np.dtype(backend.default_float_dtype() if dtype is None else dtype)


def zeros(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.module_for(device)
    return Tensor(xp.zeros(_shape(shape), dtype=_dtype(dtype)), requires_grad=requires_grad)


def ones(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.module_for(device)
    return Tensor(xp.ones(_shape(shape), dtype=_dtype(dtype)), requires_grad=requires_grad)


def full(shape, value, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    xp = backend.module_for(device)
    return Tensor(xp.full(_shape((shape,)), value, dtype=_dtype(dtype)), requires_grad=requires_grad)


def zeros_like(x, requires_grad=False) -> Tensor:
    xp = backend.array_module(x.data)
    return Tensor(xp.zeros_like(x.data), requires_grad=requires_grad)


def ones_like(x, requires_grad=False) -> Tensor:
    xp = backend.array_module(x.data)
    return Tensor(xp.ones_like(x.data), requires_grad=requires_grad)


def randn(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    """Standard normal samples from tinymoe's seeded generator (see manual_seed)."""
    data = backend.rng(device).standard_normal(_shape(shape), dtype=_dtype(dtype))
    return Tensor(data, requires_grad=requires_grad)


def rand(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    """Uniform [0, 1) samples from tinymoe's seeded generator."""
    data = backend.rng(device).random(_shape(shape), dtype=_dtype(dtype))
    return Tensor(data, requires_grad=requires_grad)


def arange(start, stop=None, step=1, dtype=None, device="cpu") -> Tensor:
    xp = backend.module_for(device)
    data = xp.arange(start, stop, step) if stop is not None else xp.arange(start)
    return Tensor(data if dtype is None else data.astype(dtype))


def _shape(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(int(n) for n in shape)
