"""Moving between devices and dtypes, inside the graph."""
from ... import backend
from ..function import Function


class ToDevice(Function):
    """y = x copied to `device`;  dL/dx = dL/dy copied back"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, device):
        ctx.source = backend.device_of(x)
        return backend.to_device(x, device)

    @staticmethod
    def backward(ctx, grad):
        return backend.to_device(grad, ctx.source)


class Cast(Function):
    """y = x as `dtype`;  dL/dx = dL/dy cast back to x's dtype"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.dtype)
