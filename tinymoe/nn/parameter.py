"""`Parameter`: a Tensor that a Module owns and an optimizer updates.

It is an ordinary leaf Tensor with `requires_grad=True` always; being a Parameter
is what makes `Module.__setattr__` register it (and `parameters()` find it).
"""
from __future__ import annotations

from ..autograd.tensor import Tensor
from ..dtypes import is_floating


class Parameter(Tensor):
    def __init__(self, data, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if hasattr(data, "dtype") and not is_floating(data.dtype):
            raise TypeError(
                f"Parameter: needs floating-point data, got {data.dtype}{tuple(data.shape)}"
            )
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()
