"""Indexing ops: getitem, gather (take_along_axis), scatter_add, index_add, where,
masked_fill, topk; and the non-differentiable one_hot, argmax, argmin, argsort."""
from ... import backend
from ..function import Function, op_error
from ..tensor import Tensor
from ._util import along_axis, scatter_add, shape_of, sum_to_shape


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(hasattr(i, "shape") or isinstance(i, (list, bool)) for i in items)


class GetItem(Function):
    """y = x[index];  dL/dx = zeros with dL/dy added at `index` (scatter-add, so an
    index that repeats accumulates its gradients)"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        xp = backend.array_module(grad)
        dx = xp.zeros(ctx.shape, dtype=grad.dtype)
        if _is_advanced(ctx.index):
            scatter_add(dx, ctx.index, grad)
        else:
            dx[ctx.index] = grad
        return dx


def getitem(x, index):
    if isinstance(index, tuple):
        index = tuple(_data(i) for i in index)
    else:
        index = _data(index)
    if isinstance(index, list):
        index = backend.array_module(x.data).asarray(index)
    return GetItem.apply(x, index=index)


class Gather(Function):
    """y = take_along_axis(x, index, axis);  dL/dx = dL/dy scatter-added at index"""

    @staticmethod
    def forward(ctx, x, index, axis):
        ctx.shape, ctx.axis = x.shape, axis
        ctx.save(index)
        return backend.array_module(x).take_along_axis(x, index, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved
        dx = backend.array_module(grad).zeros(ctx.shape, dtype=grad.dtype)
        return scatter_add(dx, along_axis(index, ctx.axis), grad), None


def gather(x, axis, index):
    index = _data(index)
    if index.ndim != x.ndim:
        raise op_error("gather", f"index {tuple(index.shape)} must have as many axes as x {x.shape}")
    return Gather.apply(x, index, axis=axis)


class ScatterAdd(Function):
    """y = x, then y[.., index[i], ..] += src[i] along `axis` (repeats accumulate);
    dL/dx = dL/dy,  dL/dsrc = take_along_axis(dL/dy, index, axis)"""

    @staticmethod
    def forward(ctx, x, index, src, axis):
        ctx.axis = axis
        ctx.save(index)
        out = x.copy()
        return scatter_add(out, along_axis(index, axis), src)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved
        dsrc = backend.array_module(grad).take_along_axis(grad, index, axis=ctx.axis)
        return grad, None, dsrc


def scatter_add_op(x, axis, index, src):
    index = _data(index)
    if tuple(index.shape) != tuple(shape_of(_data(src))):
        raise op_error("scatter_add", f"index {tuple(index.shape)} and src {tuple(shape_of(_data(src)))} must have one shape")
    return ScatterAdd.apply(x, index, src, axis=axis)


class IndexAdd(Function):
    """y = x, then y[index[i]] += source[i] along `axis` (index is 1-D);
    dL/dx = dL/dy,  dL/dsource = dL/dy[index] along `axis`"""

    @staticmethod
    def forward(ctx, x, index, source, axis):
        xp = backend.array_module(x)
        ctx.axis = axis
        ctx.save(index)
        out = x.copy()
        scatter_add(xp.moveaxis(out, axis, 0), index, xp.moveaxis(source, axis, 0))
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved
        return grad, None, backend.array_module(grad).take(grad, index, axis=ctx.axis)


def index_add(x, axis, index, source):
    index = _data(index)
    if index.ndim != 1:
        raise op_error("index_add", f"index must be 1-D, got shape {tuple(index.shape)}")
    return IndexAdd.apply(x, index, source, axis=axis)


class Where(Function):
    """y = x where cond else other;  dL/dx = dL/dy where cond, dL/dother = elsewhere"""

    float_inputs = ()

    @staticmethod
    def forward(ctx, cond, x, other):
        ctx.save(cond)
        ctx.shapes = (shape_of(x), shape_of(other))
        return backend.array_module(cond).where(cond, x, other)

    @staticmethod
    def backward(ctx, grad):
        (cond,) = ctx.saved
        _, gx, gy = ctx.needs_input_grad
        zero = grad.dtype.type(0)
        xp = backend.array_module(grad)
        dx = sum_to_shape(xp.where(cond, grad, zero), ctx.shapes[0]) if gx else None
        dy = sum_to_shape(xp.where(cond, zero, grad), ctx.shapes[1]) if gy else None
        return None, dx, dy


def where(cond, x, other):
    return Where.apply(_data(cond), x, other)


def masked_fill(x, mask, value):
    """x with `value` wherever mask is True (the gradient there is 0)."""
    return Where.apply(_data(mask), value, x)


class TopK(Function):
    """values, indices = the k largest (or smallest) entries along `axis`, sorted;
    dL/dx = dL/dvalues put back at `indices`, 0 elsewhere"""

    @staticmethod
    def forward(ctx, x, k, axis=-1, largest=True):
        xp = backend.array_module(x)
        if xp is not backend.np and axis in (-1, x.ndim - 1):
            from ...kernels import topk as kernel                  # a router's few experts:
            if kernel.supports(x, k):                              # one launch, no sort, no sync
                values, indices = kernel.topk_rows(x, k, largest)
                ctx.shape, ctx.axis = x.shape, axis
                ctx.save(indices)
                return values, indices
        key = -x if largest else x
        if xp is backend.np:
            order = xp.argsort(key, axis=axis, kind="stable")
        else:
            order = xp.argsort(key, axis=axis)
        indices = xp.take(order, xp.arange(k), axis=axis)
        ctx.shape, ctx.axis = x.shape, axis
        ctx.save(indices)
        return xp.take_along_axis(x, indices, axis=axis), indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved
        dx = backend.array_module(grad_values).zeros(ctx.shape, dtype=grad_values.dtype)
        dx[along_axis(indices, ctx.axis)] = grad_values
        return dx


def topk(x, k, axis=-1, largest=True):
    n = x.shape[axis]
    if not 1 <= k <= n:
        raise op_error("topk", f"k={k} must be in [1, {n}] for axis {axis} of shape {x.shape}")
    return TopK.apply(x, k=k, axis=axis, largest=largest)


# --------------------------------------------------- not differentiable
def one_hot(ids, num_classes, dtype="float32"):
    """(...,) ints -> (..., num_classes) with a 1 at each id."""
    ids = _data(ids)
    xp = backend.array_module(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise op_error("one_hot", f"ids must be in [0, {num_classes}), got min {int(ids.min())} max {int(ids.max())}")
    return Tensor._make((ids[..., None] == xp.arange(num_classes)).astype(dtype), False, None, 0)


def argmax(x, axis=None):
    return Tensor._make(backend.array_module(_data(x)).argmax(_data(x), axis=axis), False, None, 0)


def argmin(x, axis=None):
    return Tensor._make(backend.array_module(_data(x)).argmin(_data(x), axis=axis), False, None, 0)


def argsort(x, axis=-1):
    return Tensor._make(backend.array_module(_data(x)).argsort(_data(x), axis=axis), False, None, 0)
