"""Normalization over the last axis: LayerNorm (Ba et al. 2016) and RMSNorm
(Zhang & Sennrich 2019).

The NumPy code below is the math (and runs on the CPU). On CuPy arrays of float32 or
float64 each forward is one fused kernel and each backward two (dx; dw and db), from
tinymoe/kernels/norm.py, instead of the dozen CuPy launches the same lines would make.
The fused forward saves x and the per-row mean and rstd, not xhat.

Half-precision inputs (float16, bfloat16) are normalized in float32 (the fused kernels load
16 bits and sum in float32; the NumPy code upcasts) and the output rounded to the input's
dtype: a mean and a variance are reductions."""
from ... import backend
from ...dtypes import upcast
from ...kernels import norm as norm_kernels
from ..function import Function, op_error


def _check(op, x, weight, bias=None):
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            raise op_error(op, f"{name} has shape {tuple(p.shape)}, expected ({d},) for input {tuple(x.shape)}")


def _fused(x, *params):
    """True when the fused GPU kernels take this call: a non-empty CuPy x of float32 or
    float64, with the weight (and bias) of the same dtype. Anything else runs the code below."""
    return (backend.is_cupy_array(x) and x.size > 0 and x.dtype in norm_kernels.DTYPES
            and all(p is None or p.dtype == x.dtype for p in params))


def _rows(x):
    """x as (rows, d), C-contiguous: a view when x already is contiguous."""
    return backend.array_module(x).ascontiguousarray(x).reshape(-1, x.shape[-1])


class LayerNorm(Function):
    """xhat = (x - mean) / sqrt(var + eps);  y = xhat * w + b.
    With g = dL/dy * w:  dL/dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + eps),
    dL/dw = sum over rows of dL/dy xhat,  dL/db = sum over rows of dL/dy"""

    @staticmethod
    def forward(ctx, x, weight, bias=None, eps=1e-5):
        _check("layer_norm", x, weight, bias)
        ctx.fused = _fused(x, weight, bias)
        if ctx.fused:                                 # one launch: y, and mean, rstd per row
            x2d = _rows(x)
            y, mean, rstd = norm_kernels.layer_norm_forward(x2d, weight, bias, eps)
            ctx.save(x2d, mean, rstd, weight)
            return y.reshape(x.shape)
        xp, dtype = backend.array_module(x), x.dtype
        x, weight, bias = upcast(x, weight, bias)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        rstd = 1 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
        xhat = centered * rstd
        ctx.save(xhat, rstd, weight)
        y = xhat * weight
        if bias is not None:
            y += bias
        return y.astype(dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        gx, gw, gb = ctx.needs_input_grad
        if ctx.fused:                                 # dx: one launch; dw, db: one launch
            x2d, mean, rstd, weight = ctx.saved
            dx, dw, db = norm_kernels.layer_norm_backward(grad.reshape(x2d.shape), x2d, weight,
                                                          mean, rstd, (gx, gw, gb))
            return (None if dx is None else dx.reshape(grad.shape)), dw, db
        xhat, rstd, weight = ctx.saved
        (grad,) = upcast(grad)
        d = xhat.shape[-1]
        dx = dw = db = None
        if gx:
            g = grad * weight
            dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        if gw:
            dw = (grad * xhat).reshape(-1, d).sum(axis=0)
        if gb:
            db = grad.reshape(-1, d).sum(axis=0)
        return dx, dw, db


class RMSNorm(Function):
    """r = 1 / sqrt(mean(x^2) + eps);  xhat = x r;  y = xhat * w.
    With g = dL/dy * w:  dL/dx = r (g - xhat mean(g xhat)),  dL/dw = sum of dL/dy xhat"""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        _check("rms_norm", x, weight)
        ctx.fused = _fused(x, weight)
        if ctx.fused:                                 # one launch: y, and r per row
            x2d = _rows(x)
            y, r = norm_kernels.rms_norm_forward(x2d, weight, eps)
            ctx.save(x2d, r, weight)
            return y.reshape(x.shape)
        xp, dtype = backend.array_module(x), x.dtype
        x, weight = upcast(x, weight)
        r = 1 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * r
        ctx.save(xhat, r, weight)
        return (xhat * weight).astype(dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.needs_input_grad
        if ctx.fused:                                 # dx: one launch; dw: one launch
            x2d, r, weight = ctx.saved
            dx, dw = norm_kernels.rms_norm_backward(grad.reshape(x2d.shape), x2d, weight, r,
                                                    (gx, gw))
            return (None if dx is None else dx.reshape(grad.shape)), dw
        xhat, r, weight = ctx.saved
        (grad,) = upcast(grad)
        dx = dw = None
        if gx:
            g = grad * weight
            dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        if gw:
            dw = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        return dx, dw
