"""Elementwise math and activations: exp, log, sqrt, abs, tanh, sigmoid, relu,
gelu (exact and tanh forms), silu, softplus.

The NumPy code below is the math (and runs on the CPU). On CuPy arrays GELU, SiLU and
softplus run as one fused kernel each (tinymoe/kernels/elementwise.py), instead of the
chain of CuPy kernels the same lines would launch."""
import math

import numpy as np

from ... import backend
from ...dtypes import is_half
from ...kernels import elementwise
from ..function import Function


class Exp(Function):
    """y = e^x;  dy/dx = e^x = y"""

    @staticmethod
    def forward(ctx, x):
        y = backend.array_module(x).exp(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * y


class Log(Function):
    """y = log x;  dy/dx = 1 / x"""

    @staticmethod
    def forward(ctx, x):
        ctx.save(x)
        return backend.array_module(x).log(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad / x


class Sqrt(Function):
    """y = sqrt(x);  dy/dx = 1 / (2 sqrt(x)) = 1 / (2 y)"""

    @staticmethod
    def forward(ctx, x):
        y = backend.array_module(x).sqrt(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad / (2 * y)


class Abs(Function):
    """y = |x|;  dy/dx = sign(x)  (0 at x = 0)"""

    @staticmethod
    def forward(ctx, x):
        xp = backend.array_module(x)
        ctx.save(xp.sign(x))
        return xp.abs(x)

    @staticmethod
    def backward(ctx, grad):
        (sign,) = ctx.saved
        return grad * sign


class Tanh(Function):
    """y = tanh x;  dy/dx = 1 - y^2"""

    @staticmethod
    def forward(ctx, x):
        y = backend.array_module(x).tanh(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * (1 - y * y)


def _sigmoid(xp, x):
    # 1 / (1 + e^-x), written to never overflow: e^-|x| <= 1.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(Function):
    """y = 1 / (1 + e^-x);  dy/dx = y (1 - y)"""

    @staticmethod
    def forward(ctx, x):
        y = _sigmoid(backend.array_module(x), x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * y * (1 - y)


class Relu(Function):
    """y = max(x, 0);  dy/dx = 1 where x > 0, else 0"""

    @staticmethod
    def forward(ctx, x):
        mask = x > 0
        ctx.save(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved
        return grad * mask


class Gelu(Function):
    """GELU (Hendrycks & Gimpel 2016).

    exact:  y = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
            dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    tanh:   y = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
            dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """

    @staticmethod
    def forward(ctx, x, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        ctx.approximate = approximate
        ctx.save(x)                                       # x alone, in its own format
        if backend.is_cupy_array(x):
            return elementwise.gelu(x, approximate)
        if is_half(x.dtype):                              # 16-bit formats: float32 inside
            return _gelu_numpy(x.astype(np.float32), approximate).astype(x.dtype)
        return _gelu_numpy(x, approximate)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        if backend.is_cupy_array(x):
            return elementwise.gelu_backward(grad, x, ctx.approximate)
        if is_half(x.dtype) or is_half(grad.dtype):       # float32 inside; the engine casts back
            x, grad = x.astype(np.float32), grad.astype(np.float32)
        if ctx.approximate == "tanh":
            c = math.sqrt(2 / math.pi)
            t = np.tanh(c * (x + 0.044715 * x**3))
            return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))
        if x.dtype == np.float32 and grad.dtype == np.float32:
            return _gelu_cpu().gelu_backward(grad, x)
        return gelu_exact_backward(grad, x)


def _gelu_numpy(x, approximate):
    """GELU of a float32 or float64 NumPy array (the CPU's forward)."""
    if approximate == "tanh":
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1 + np.tanh(u))
    if x.dtype == np.float32:
        return _gelu_cpu().gelu(x)                        # the same formula, one Numba pass
    return gelu_exact(x)


def gelu_exact(x):
    """The spec of exact GELU in NumPy: y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def gelu_exact_backward(grad, x):
    """The spec of its backward: dL/dx = grad (Phi(x) + x phi(x)), phi(x) = e^(-x^2/2) / sqrt(2 pi)."""
    cdf = 0.5 * (1 + _erf(x / math.sqrt(2)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return grad * (cdf + x * pdf)


def _erf(x):
    from scipy.special import erf

    return erf(x).astype(x.dtype, copy=False)


def _gelu_cpu():
    """tinymoe.kernels.gelu_cpu, imported on first use (Numba compiles it then)."""
    from ...kernels import gelu_cpu

    return gelu_cpu


class Silu(Function):
    """y = x sigmoid(x)  (SiLU / swish);  dy/dx = s + x s (1 - s),  s = sigmoid(x)"""

    @staticmethod
    def forward(ctx, x):
        if backend.is_cupy_array(x):
            ctx.save(x)                                   # the kernel recomputes s
            return elementwise.silu(x)
        s = _sigmoid(np, x)
        ctx.save(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        if backend.is_cupy_array(ctx.saved[0]):
            return elementwise.silu_backward(grad, ctx.saved[0])
        x, s = ctx.saved
        return grad * (s * (1 + x * (1 - s)))


class Softplus(Function):
    """y = log(1 + e^x), computed as max(x, 0) + log1p(e^-|x|) (no overflow for large x);
    dy/dx = sigmoid(x)"""

    @staticmethod
    def forward(ctx, x):
        ctx.save(x)
        if backend.is_cupy_array(x):
            return elementwise.softplus(x)
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        if backend.is_cupy_array(x):
            return elementwise.softplus_backward(grad, x)
        return grad * _sigmoid(np, x)
