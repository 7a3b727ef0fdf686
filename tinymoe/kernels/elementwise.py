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

The activations of contiguous, 16-byte aligned arrays (every array the layers make) run as
the whole-array kernels of activation.cu, 16 bytes per load: a cupy.ElementwiseKernel spends
more on index arithmetic than on memory (320 us for 2^26 elements of any dtype on an H100,
0.84 TB/s in bfloat16; a copy runs at 2.9). Other layouts take the ElementwiseKernel.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy
from ..dtypes import accumulation_dtype, as_dtype, is_half
from .norm import CTYPES

SOURCE = Path(__file__).with_name("elementwise.cu")
ARRAY_SOURCE = Path(__file__).with_name("activation.cu")
THREADS, MAX_BLOCKS = 256, 4096

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


# activation -> (f, f'): the device functions of elementwise.cu that activation.cu applies
ARRAY_KERNELS = {
    "gelu": ("tinymoe_gelu", "tinymoe_gelu_grad"),
    "gelu_tanh": ("tinymoe_gelu_tanh", "tinymoe_gelu_tanh_grad"),
    "silu": ("tinymoe_silu", "tinymoe_silu_grad"),
    "softplus": ("tinymoe_softplus", "tinymoe_sigmoid"),
}


def array_options(name, dtype):
    """The -D defines that specialise activation.cu (also used by the compile test)."""
    dtype = as_dtype(dtype)
    f, slope = ARRAY_KERNELS[name]
    return (f"-Ddata_t={CTYPES[dtype]}", f"-Dacc_t={CTYPES[accumulation_dtype(dtype)]}",
            f"-DACTIVATION={f}", f"-DSLOPE={slope}")


def array_source(dtype) -> str:
    """activation.cu with what it needs in front: the 16-bit types, elementwise.cu."""
    half = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" if is_half(as_dtype(dtype)) else ""
    return half + SOURCE.read_text() + ARRAY_SOURCE.read_text()


@lru_cache(maxsize=None)
def _array_module(name, dtype_name):
    return cupy().RawModule(code=array_source(dtype_name), options=array_options(name, dtype_name))


def _whole(*arrays) -> bool:
    """Whether activation.cu can take these arrays: one dtype it knows, C-contiguous, 16-byte
    aligned addresses."""
    return (len({a.dtype for a in arrays}) == 1 and arrays[0].dtype in CTYPES
            and all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in arrays))


def _launch(name, which, out, *arrays):
    n = out.size
    if n:
        vec = 16 // out.itemsize
        blocks = min(max(-(-n // (vec * THREADS)), 1), MAX_BLOCKS)
        _array_module(name, out.dtype.name).get_function(f"activation_{which}")(
            (blocks,), (THREADS,), (*arrays, out, np.int64(n)))
    return out


def _forward(name, x):
    if _whole(x):
        return _launch(name, "forward", cupy().empty_like(x), x)
    return kernel(name, x.dtype)(x)


def _backward(name, grad, x):
    grad = grad.astype(x.dtype, copy=False)
    if _whole(grad, x):
        return _launch(name, "backward", cupy().empty_like(x), grad, x)
    return kernel(name + "_backward", x.dtype)(grad, x)


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
    return _forward(_gelu_name(approximate), x)


def gelu_backward(grad, x, approximate="none"):
    """dL/dx = grad * GELU'(x)."""
    return _backward(_gelu_name(approximate), grad, x)


def silu(x):
    """y = x sigmoid(x)."""
    return _forward("silu", x)


def silu_backward(grad, x):
    """dL/dx = grad * s (1 + x (1 - s)),  s = sigmoid(x)."""
    return _backward("silu", grad, x)


def softplus(x):
    """y = log(1 + e^x), overflow-free."""
    return _forward("softplus", x)


def softplus_backward(grad, x):
    """dL/dx = grad * sigmoid(x)."""
    return _backward("softplus", grad, x)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step of optim/adamw.py, in place on p, m, v (one launch); step t >= 1.
    The scalars are rounded to p's dtype first, as NumPy does with Python floats."""
    t = p.dtype.type
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    kernel("adamw")(g, t(1 - lr * weight_decay), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
                    t(lr / c1), t(math.sqrt(c2)), t(eps), p, m, v)
