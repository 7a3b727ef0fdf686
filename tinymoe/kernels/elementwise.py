"""Fused elementwise GPU kernels: one launch and one pass over memory per op.

Written in CuPy array code, exact GELU's forward is ~4 kernels and its backward ~8 (erf, exp,
multiplies, adds), each a full read and write of the (rows, d_ff) hidden with temporaries;
here each is one `cupy.ElementwiseKernel`. The same for SiLU, softplus, and the AdamW update
(a dozen CuPy kernels per parameter become one).

    gelu(x, approximate)            gelu_backward(grad, x, approximate)
    silu(x)                         silu_backward(grad, x)
    softplus(x)                     softplus_backward(grad, x)
    adamw_update(p, g, m, v, lr=, beta1=, beta2=, eps=, weight_decay=, step=)   in place

CuPy arrays in and out. The device functions are in elementwise.cu; the spec each kernel is
tested against is the NumPy code in tinymoe/autograd/ops/unary.py and tinymoe/optim/adamw.py,
which the callers run on the CPU.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy

SOURCE = Path(__file__).with_name("elementwise.cu")

# name -> (input params, output params, body), cupy.ElementwiseKernel's three strings. The
# activations compute in acc_t (typedef'd per kernel: float for float16 and bfloat16 arrays,
# else T itself): 16-bit elements are widened as they are read and rounded once when written.
KERNELS = {
    "gelu": ("T x", "T y", "y = T(tinymoe_gelu(acc_t(x)))"),
    "gelu_backward": ("T g, T x", "T dx", "dx = T(acc_t(g) * tinymoe_gelu_grad(acc_t(x)))"),
    "gelu_tanh": ("T x", "T y", "y = T(tinymoe_gelu_tanh(acc_t(x)))"),
    "gelu_tanh_backward": ("T g, T x", "T dx",
                           "dx = T(acc_t(g) * tinymoe_gelu_tanh_grad(acc_t(x)))"),
    "silu": ("T x", "T y", "y = T(tinymoe_silu(acc_t(x)))"),
    "silu_backward": ("T g, T x", "T dx", "dx = T(acc_t(g) * tinymoe_silu_grad(acc_t(x)))"),
    "softplus": ("T x", "T y", "y = T(tinymoe_softplus(acc_t(x)))"),
    "softplus_backward": ("T g, T x", "T dx", "dx = T(acc_t(g) * tinymoe_sigmoid(acc_t(x)))"),
    "adamw": ("T g, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
              "T step_size, T sqrt_c2, T eps",
              "T p, T m, T v",
              "tinymoe_adamw(p, m, v, g, decay, beta1, one_minus_beta1, beta2, "
              "one_minus_beta2, step_size, sqrt_c2, eps)"),
}


@lru_cache(maxsize=None)
def _kernel(name, acc):
    in_params, out_params, body = KERNELS[name]
    return cupy().ElementwiseKernel(in_params, out_params, body, f"tinymoe_{name}",
                                    preamble=f"typedef {acc} acc_t;\n" + SOURCE.read_text())


def kernel(name, dtype=np.float32):
    """The ElementwiseKernel `name` for arrays of `dtype` (compiled per dtype by CuPy on
    first call; float16 and bfloat16 compute in float)."""
    return _kernel(name, "double" if np.dtype(dtype) == np.float64 else "float")


def _gelu_name(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


def gelu(x, approximate="none"):
    """y = x Phi(x) (exact) or x/2 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
    return kernel(_gelu_name(approximate), x.dtype)(x)


def gelu_backward(grad, x, approximate="none"):
    """dL/dx = grad * GELU'(x)."""
    return kernel(_gelu_name(approximate) + "_backward", x.dtype)(grad.astype(x.dtype, copy=False), x)


def silu(x):
    """y = x sigmoid(x)."""
    return kernel("silu", x.dtype)(x)


def silu_backward(grad, x):
    """dL/dx = grad * s (1 + x (1 - s)),  s = sigmoid(x)."""
    return kernel("silu_backward", x.dtype)(grad.astype(x.dtype, copy=False), x)


def softplus(x):
    """y = log(1 + e^x), overflow-free."""
    return kernel("softplus", x.dtype)(x)


def softplus_backward(grad, x):
    """dL/dx = grad * sigmoid(x)."""
    return kernel("softplus_backward", x.dtype)(grad.astype(x.dtype, copy=False), x)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step of optim/adamw.py, in place on p, m, v (one launch); step t >= 1.
    The scalars are rounded to p's dtype first, as NumPy does with Python floats."""
    t = p.dtype.type
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    kernel("adamw")(g, t(1 - lr * weight_decay), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
                    t(lr / c1), t(math.sqrt(c2)), t(eps), p, m, v)
