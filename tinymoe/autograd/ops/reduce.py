"""Reductions: sum, mean, var, max/min, logsumexp, cumsum.

Sums of half-precision (float16, bfloat16) data accumulate in float32 and round once at the
end (tinymoe/dtypes.py says why)."""
from ... import backend
from ...dtypes import is_half, upcast
from ..function import Function
from ._util import along_axis, expand_reduced, normalize_axis


def _count(shape, axis):
    n = 1
    for a in normalize_axis(axis, len(shape)):
        n *= shape[a]
    return n


class Sum(Function):
    """y = sum_i x_i over `axis`;  dy/dx_i = 1 (the gradient is broadcast back)"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        if is_half(x.dtype):
            return x.sum(axis=axis, keepdims=keepdims, dtype="float32").astype(x.dtype)
        return x.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        grad = expand_reduced(grad, ctx.shape, ctx.axis, ctx.keepdims)
        return backend.array_module(grad).broadcast_to(grad, ctx.shape)


class Mean(Function):
    """y = (1/n) sum_i x_i;  dy/dx_i = 1/n"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        if is_half(x.dtype):
            return x.mean(axis=axis, keepdims=keepdims, dtype="float32").astype(x.dtype)
        return x.mean(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        grad = expand_reduced(grad, ctx.shape, ctx.axis, ctx.keepdims)
        n = _count(ctx.shape, ctx.axis)
        return backend.array_module(grad).broadcast_to(grad / n, ctx.shape)


class Var(Function):
    """v = 1/(n - ddof) sum_i (x_i - mean)^2;  dv/dx_i = 2 (x_i - mean) / (n - ddof)"""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False, ddof=0):
        dtype = x.dtype
        if is_half(dtype):
            x = x.astype("float32")
        centered = x - x.mean(axis=axis, keepdims=True)
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        ctx.denominator = _count(x.shape, axis) - ddof
        ctx.save(centered)
        return ((centered * centered).sum(axis=axis, keepdims=keepdims) / ctx.denominator).astype(dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        (centered,) = ctx.saved
        grad = expand_reduced(grad, ctx.shape, ctx.axis, ctx.keepdims)
        return grad * (2 / ctx.denominator) * centered


class _Extremum(Function):
    """y = max (or min) over `axis`; the gradient goes to the FIRST extreme entry only
    (like NumPy's argmax), so ties do not split or duplicate it."""

    float_inputs = ()

    pick = None  # "argmax" or "argmin"

    @classmethod
    def forward(cls, ctx, x, axis=None, keepdims=False):
        xp = backend.array_module(x)
        axes = normalize_axis(axis, x.ndim)
        # Move the reduced axes to the end and flatten them into one.
        kept = tuple(a for a in range(x.ndim) if a not in axes)
        moved = xp.transpose(x, kept + axes)
        flat = moved.reshape(moved.shape[: len(kept)] + (-1,))
        idx = getattr(xp, cls.pick)(flat, axis=-1)
        y = xp.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
        ctx.shape, ctx.axis, ctx.keepdims, ctx.kept, ctx.axes = x.shape, axis, keepdims, kept, axes
        ctx.save(idx)
        if keepdims:
            y = y.reshape(tuple(1 if a in axes else n for a, n in enumerate(x.shape)))
        return y

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved
        xp = backend.array_module(grad)
        kept_shape = tuple(ctx.shape[a] for a in ctx.kept)
        reduced = 1
        for a in ctx.axes:
            reduced *= ctx.shape[a]
        grad = grad.reshape(kept_shape)
        flat = xp.zeros(kept_shape + (reduced,), dtype=grad.dtype)
        flat[along_axis(idx[..., None], -1)] = grad[..., None]
        moved = flat.reshape(kept_shape + tuple(ctx.shape[a] for a in ctx.axes))
        order = ctx.kept + ctx.axes
        inverse = [order.index(a) for a in range(len(ctx.shape))]
        return xp.transpose(moved, inverse)


class Max(_Extremum):
    pick = "argmax"


class Min(_Extremum):
    pick = "argmin"


class LogSumExp(Function):
    """y = log sum_i e^{x_i} = m + log sum_i e^{x_i - m}  (m = max x: no overflow);
    dy/dx_i = e^{x_i - y} = softmax(x)_i"""

    @staticmethod
    def forward(ctx, x, axis=-1, keepdims=False):
        xp, dtype = backend.array_module(x), x.dtype
        x, = upcast(x)                                       # half formats: float32 inside
        m = x.max(axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)
        y = xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True)) + m
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        ctx.save(x, y)
        return (y if keepdims else y.squeeze(axis=axis)).astype(dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved
        grad = expand_reduced(grad, ctx.shape, ctx.axis, ctx.keepdims)
        return grad * backend.array_module(x).exp(x - y)


class Cumsum(Function):
    """y_t = sum_{s <= t} x_s;  dL/dx_s = sum_{t >= s} dL/dy_t  (a reversed cumsum)"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, axis=-1):
        ctx.axis = axis
        return backend.array_module(x).cumsum(x, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.array_module(grad)
        flipped = xp.flip(grad, axis=ctx.axis)
        return xp.flip(xp.cumsum(flipped, axis=ctx.axis), axis=ctx.axis)
