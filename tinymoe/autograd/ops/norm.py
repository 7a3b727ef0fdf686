"""Normalization over the last axis: LayerNorm (Ba et al. 2016) and RMSNorm
(Zhang & Sennrich 2019)."""
from ... import backend
from ..function import Function, op_error


def _check(op, x, weight, bias=None):
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            raise op_error(op, f"{name} has shape {tuple(p.shape)}, expected ({d},) for input {tuple(x.shape)}")


class LayerNorm(Function):
    """xhat = (x - mean) / sqrt(var + eps);  y = xhat * w + b.
    With g = dL/dy * w:  dL/dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + eps),
    dL/dw = sum over rows of dL/dy xhat,  dL/db = sum over rows of dL/dy"""

    @staticmethod
    def forward(ctx, x, weight, bias=None, eps=1e-5):
        _check("layer_norm", x, weight, bias)
        xp = backend.array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        rstd = 1 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
        xhat = centered * rstd
        ctx.save(xhat, rstd, weight)
        y = xhat * weight
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved
        gx, gw, gb = ctx.needs_input_grad
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
        xp = backend.array_module(x)
        r = 1 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * r
        ctx.save(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved
        gx, gw = ctx.needs_input_grad
        dx = dw = None
        if gx:
            g = grad * weight
            dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        if gw:
            dw = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        return dx, dw
