"""Matrix products: batched, broadcasting matmul and the fused linear layer.

A product with a 16-bit operand (float16, bfloat16) runs in that format with float32
accumulation (tinymoe/kernels/matmul.py): mixed precision's rule for matmuls."""
from ... import backend
from ...kernels.matmul import matmul as mm
from ...kernels.matmul import same_format
from ...dtypes import is_half
from ..function import Function, op_error
from ._util import sum_to_shape


class MatMul(Function):
    """Z = X @ Y  (batched over leading axes, which broadcast);
    dL/dX = dL/dZ @ Y^T,  dL/dY = X^T @ dL/dZ  (each summed over broadcast axes)"""

    @staticmethod
    def forward(ctx, x, y):
        if x.shape[-1] != y.shape[-2]:
            raise op_error(
                "matmul",
                f"inner dimensions differ: {tuple(x.shape)} @ {tuple(y.shape)} "
                f"({x.shape[-1]} != {y.shape[-2]})",
            )
        x, y = same_format(x, y)
        ctx.save(x, y)
        return mm(x, y)

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved
        gx, gy = ctx.needs_input_grad
        xp = backend.array_module(grad)
        grad = grad.astype(x.dtype, copy=False)
        dx = sum_to_shape(mm(grad, xp.swapaxes(y, -1, -2)), x.shape) if gx else None
        dy = sum_to_shape(mm(xp.swapaxes(x, -1, -2), grad), y.shape) if gy else None
        return dx, dy


def matmul(x, y):
    """x @ y; a 1-D operand is treated as a row (left) or column (right) vector."""
    from .shape import reshape

    for name, t in (("left", x), ("right", y)):
        if getattr(t, "ndim", 0) == 0:
            raise op_error("matmul", f"the {name} operand is a scalar; use * instead")
    squeeze_left = x.ndim == 1
    squeeze_right = y.ndim == 1
    if squeeze_left:
        x = reshape(x, 1, x.shape[0]) if hasattr(x, "_ctx") else x.reshape(1, -1)
    if squeeze_right:
        y = reshape(y, y.shape[0], 1) if hasattr(y, "_ctx") else y.reshape(-1, 1)
    z = MatMul.apply(x, y)
    if squeeze_left:
        z = reshape(z, *(z.shape[:-2] + z.shape[-1:]))
    if squeeze_right:
        z = reshape(z, *z.shape[:-1])
    return z


class LinearFunction(Function):
    """y = x W^T + b  with W (out, in), x (..., in), y (..., out);
    dL/dx = dL/dy W,  dL/dW = sum over rows of dL/dy^T x,  dL/db = sum over rows of dL/dy.

    One op instead of transpose + matmul + add: less graph, and the weight gradient is
    a single (out, M) @ (M, in) product over all M rows."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise op_error(
                "linear",
                f"input has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}",
            )
        x, weight = same_format(x, weight)
        ctx.save(x, weight)
        y = mm(x, weight.T)
        if bias is not None:
            y += bias.astype(y.dtype, copy=False)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved
        gx, gw, gb = ctx.needs_input_grad
        grad = grad.astype(x.dtype, copy=False)
        dx = mm(grad, weight) if gx else None
        grad2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
        dw = mm(grad2d.T, x.reshape(-1, x.shape[-1])) if gw else None
        db = _sum_rows(grad2d) if gb else None
        return dx, dw, db


def _sum_rows(g):
    """sum over the rows of g (M, n), in float32 for 16-bit g, rounded to g's dtype."""
    if is_half(g.dtype):
        return g.sum(axis=0, dtype="float32").astype(g.dtype)
    return g.sum(axis=0)
