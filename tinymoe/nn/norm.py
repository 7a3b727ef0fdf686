"""Normalization layers: LayerNorm (Ba et al., 2016) and RMSNorm (Zhang & Sennrich, 2019)."""
from __future__ import annotations

from .. import backend
from . import functional as F
from .module import Module
from .parameter import Parameter


class LayerNorm(Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True,
                 device: str = "cpu", dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        xp, dtype = backend.module_for(device), dtype or backend.default_float_dtype()
        self.weight = Parameter(xp.ones(dim, dtype=dtype))
        self.bias = Parameter(xp.zeros(dim, dtype=dtype)) if bias else None

    def forward(self, x):
        # x (..., dim) -> (..., dim)
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (no centering, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, device: str = "cpu", dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        xp, dtype = backend.module_for(device), dtype or backend.default_float_dtype()
        self.weight = Parameter(xp.ones(dim, dtype=dtype))

    def forward(self, x):
        # x (..., dim) -> (..., dim)
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"
