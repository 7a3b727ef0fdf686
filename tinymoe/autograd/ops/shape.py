"""Shape ops: reshape, transpose, broadcast_to, squeeze/unsqueeze, concat, stack,
split, pad. None of them changes a value, so each backward just moves the gradient
back to where the value came from."""
import itertools

from ... import backend
from ..function import Function, op_error
from ._util import sum_to_shape


class Reshape(Function):
    """y = x viewed with another shape;  dL/dx = dL/dy reshaped back"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)


class Transpose(Function):
    """y = x with axes permuted;  dL/dx = dL/dy with the inverse permutation"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, axes):
        ctx.axes = axes
        return backend.array_module(x).transpose(x, axes)

    @staticmethod
    def backward(ctx, grad):
        inverse = [0] * len(ctx.axes)
        for i, a in enumerate(ctx.axes):
            inverse[a] = i
        return backend.array_module(grad).transpose(grad, inverse)


class BroadcastTo(Function):
    """y = x repeated along broadcast axes;  dL/dx = sum of dL/dy over those axes"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return backend.array_module(x).broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, grad):
        return sum_to_shape(grad, ctx.shape)


class Concat(Function):
    """y = [x_1 | x_2 | ...] along `axis`;  dL/dx_i = the slice of dL/dy that x_i filled"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, *xs, axis=0):
        xp = backend.array_module(xs[0])
        ctx.axis = axis
        ctx.sizes = [x.shape[axis] for x in xs]
        return xp.concatenate(xs, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        bounds = list(itertools.accumulate(ctx.sizes[:-1]))
        return tuple(backend.array_module(grad).split(grad, bounds, axis=ctx.axis))


class Stack(Function):
    """y = x_1, x_2, ... stacked on a new `axis`;  dL/dx_i = dL/dy indexed at i"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, *xs, axis=0):
        ctx.axis = axis
        return backend.array_module(xs[0]).stack(xs, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.array_module(grad)
        return tuple(xp.moveaxis(grad, ctx.axis, 0))


class Split(Function):
    """x cut along `axis` at `bounds` into several outputs;  dL/dx = the gradients
    of the pieces concatenated back (zeros for pieces nobody used)"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, bounds, axis=0):
        ctx.axis = axis
        return tuple(backend.array_module(x).split(x, bounds, axis=axis))

    @staticmethod
    def backward(ctx, *grads):
        return backend.array_module(grads[0]).concatenate(grads, axis=ctx.axis)


class Pad(Function):
    """y = x with `pad_width` (NumPy's format) of a constant around it;
    dL/dx = the centre of dL/dy"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, pad_width, value=0.0):
        ctx.slices = tuple(slice(before, before + n) for (before, _), n in zip(pad_width, x.shape))
        return backend.array_module(x).pad(x, pad_width, constant_values=value)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.slices]


# ----------------------------------------------------------- friendly wrappers
def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def reshape(x, *shape):
    shape = _shape_args(shape)
    size = x.data.size
    known = 1
    for n in shape:
        if n != -1:
            known *= n
    if shape.count(-1) > 1 or (-1 not in shape and known != size) or (
        -1 in shape and (known == 0 or size % known)
    ):
        raise op_error("reshape", f"cannot reshape a tensor of shape {x.shape} into {shape}")
    return Reshape.apply(x, shape=shape)


def transpose(x, *axes):
    axes = _shape_args(axes) or tuple(reversed(range(x.ndim)))
    if sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
        raise op_error("transpose", f"axes {axes} are not a permutation of a tensor of shape {x.shape}")
    return Transpose.apply(x, axes=tuple(a % x.ndim for a in axes))


def swapaxes(x, axis1, axis2):
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return Transpose.apply(x, axes=tuple(axes))


def squeeze(x, axis=None):
    if axis is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        axes = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        for a in axes:
            if x.shape[a] != 1:
                raise op_error("squeeze", f"axis {a} of shape {x.shape} has size {x.shape[a]}, not 1")
        shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    return Reshape.apply(x, shape=shape)


def unsqueeze(x, axis):
    axis = axis % (x.ndim + 1)
    return Reshape.apply(x, shape=x.shape[:axis] + (1,) + x.shape[axis:])


def concat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise op_error("concat", "needs at least one tensor")
    shapes = [tuple(getattr(t, "shape", ())) for t in tensors]
    nd = len(shapes[0])
    ax = axis % max(nd, 1)
    for s in shapes:
        if len(s) != nd or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != ax):
            raise op_error("concat", f"shapes {shapes} differ outside axis {axis}")
    return Concat.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    tensors = list(tensors)
    shapes = [tuple(getattr(t, "shape", ())) for t in tensors]
    if not tensors or any(s != shapes[0] for s in shapes):
        raise op_error("stack", f"needs tensors of one shape, got {shapes}")
    return Stack.apply(*tensors, axis=axis)


def split(x, sections, axis=0):
    """Split into `sections` equal parts (an int) or at sizes given as a list."""
    n = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or n % sections:
            raise op_error("split", f"axis {axis} of shape {x.shape} does not divide into {sections} parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
        if sum(sizes) != n:
            raise op_error("split", f"sizes {sizes} do not add up to {n} (axis {axis} of {x.shape})")
    bounds = list(itertools.accumulate(sizes[:-1]))
    return list(Split.apply(x, bounds=bounds, axis=axis))


def pad(x, pad_width, value=0.0):
    pad_width = tuple((int(a), int(b)) for a, b in pad_width)
    if len(pad_width) != x.ndim:
        raise op_error("pad", f"pad_width has {len(pad_width)} pairs for a tensor of shape {x.shape}")
    return Pad.apply(x, pad_width=pad_width, value=value)

