"""`Parameter`: a Tensor that a Module owns and an optimizer updates.

It is an ordinary leaf Tensor with `requires_grad=True` always; being a Parameter
is what makes `Module.__setattr__` register it (and `parameters()` find it).
"""
from __future__ import annotations

from ..autograd.tensor import Tensor


class Parameter(Tensor):
    def __init__(self, data, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        kind = getattr(getattr(data, "dtype", None), "kind", "f")
        if kind not in "fc":
            raise TypeError(
                f"Parameter: needs floating-point data, got {data.dtype}{tuple(data.shape)}"
            )
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()
