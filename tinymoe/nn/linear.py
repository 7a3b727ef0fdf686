"""`Linear`: y = x W^T + b, the affine map of every MLP and projection."""
from __future__ import annotations

import math

from .. import backend
from . import functional as F
from .module import Module
from .parameter import Parameter


def uniform(shape, bound: float, device: str = "cpu", dtype=None):
    """An array drawn from U(-bound, bound) with tinymoe's seeded generator."""
    dtype = dtype or backend.default_float_dtype()
    u = backend.rng(device).random(shape, dtype=dtype)  # U(0, 1)
    return (2 * u - 1) * bound


class Linear(Module):
    """weight (out_features, in_features), bias (out_features,), both initialised
    from U(-1/sqrt(in_features), 1/sqrt(in_features)) as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: str = "cpu", dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(uniform((out_features, in_features), bound, device, dtype))
        self.bias = Parameter(uniform((out_features,), bound, device, dtype)) if bias else None

    def forward(self, x):
        # x (..., in) -> (..., out):  y = x W^T + b
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
