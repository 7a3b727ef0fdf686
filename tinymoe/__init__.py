"""tinymoe: a from-scratch autograd framework over NumPy and CuPy, for Mixture-of-
Experts transformers and Mamba models. See README.md and docs/."""
from . import backend
from .autograd import Function, Tensor, enable_grad, gradcheck, no_grad
from .autograd.ops import argmax, argmin, argsort, concat, one_hot, stack, where
from .backend import cuda_available, manual_seed
from .creation import arange, full, ones, ones_like, rand, randn, tensor, zeros, zeros_like

from . import nn, optim  # noqa: E402  (tinymoe.nn.Linear, tinymoe.optim.AdamW)

__version__ = "0.1.0"

float32 = backend.np.float32
float64 = backend.np.float64
int64 = backend.np.int64

__all__ = [
    "Tensor", "Function", "tensor", "zeros", "ones", "full", "zeros_like", "ones_like",
    "randn", "rand", "arange", "concat", "stack", "where", "one_hot", "argmax", "argmin",
    "argsort", "no_grad", "enable_grad", "gradcheck", "manual_seed", "cuda_available",
    "backend", "nn", "optim", "float32", "float64", "int64",
]
