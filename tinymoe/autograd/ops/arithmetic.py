"""Elementwise arithmetic with NumPy broadcasting: add, sub, mul, div, neg, pow.

Every backward reduces its gradient to the input's shape with `sum_to_shape`.
"""
from ... import backend
from ..function import Function
from ._util import shape_of, sum_to_shape


class Add(Function):
    """z = x + y;  dz/dx = 1, dz/dy = 1"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, y):
        ctx.shapes = (shape_of(x), shape_of(y))
        return x + y

    @staticmethod
    def backward(ctx, grad):
        sx, sy = ctx.shapes
        gx, gy = ctx.needs_input_grad
        return (sum_to_shape(grad, sx) if gx else None, sum_to_shape(grad, sy) if gy else None)


class Sub(Function):
    """z = x - y;  dz/dx = 1, dz/dy = -1"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, y):
        ctx.shapes = (shape_of(x), shape_of(y))
        return x - y

    @staticmethod
    def backward(ctx, grad):
        sx, sy = ctx.shapes
        gx, gy = ctx.needs_input_grad
        return (sum_to_shape(grad, sx) if gx else None, sum_to_shape(-grad, sy) if gy else None)


class Mul(Function):
    """z = x * y;  dz/dx = y, dz/dy = x"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, y):
        ctx.save(x, y)
        return x * y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved
        gx, gy = ctx.needs_input_grad
        return (
            sum_to_shape(grad * y, shape_of(x)) if gx else None,
            sum_to_shape(grad * x, shape_of(y)) if gy else None,
        )


class Div(Function):
    """z = x / y;  dz/dx = 1 / y, dz/dy = -x / y^2"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, y):
        ctx.save(x, y)
        return x / y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved
        gx, gy = ctx.needs_input_grad
        return (
            sum_to_shape(grad / y, shape_of(x)) if gx else None,
            sum_to_shape(-grad * x / (y * y), shape_of(y)) if gy else None,
        )


class Neg(Function):
    """z = -x;  dz/dx = -1"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Pow(Function):
    """z = x ** y;  dz/dx = y x^(y-1),  dz/dy = x^y log x  (needs x > 0)"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, y):
        z = x**y
        ctx.save(x, y, z)
        return z

    @staticmethod
    def backward(ctx, grad):
        x, y, z = ctx.saved
        gx, gy = ctx.needs_input_grad
        dx = dy = None
        if gx:
            dx = sum_to_shape(grad * y * x ** (y - 1), shape_of(x))
        if gy:
            xp = backend.array_module(z)
            dy = sum_to_shape(grad * z * xp.log(x), shape_of(y))
        return dx, dy
