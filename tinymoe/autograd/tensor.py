"""`Tensor`: an array (NumPy or CuPy), its gradient, and the op that made it.

    x = tinymoe.tensor([[1.0, 2.0]], requires_grad=True)
    loss = (x * x).sum()
    loss.backward()          # x.grad == 2 * x.data

Methods are thin: each one calls an op (`tinymoe.autograd.ops`), where the math is.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import as_dtype, is_floating


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_out_index", "__weakref__", "__dict__")

    # NumPy must not swallow `array * tensor`: make it call Tensor.__rmul__ instead.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, requires_grad: bool = False, device=None, dtype=None):
        self.data = _as_array(data, device, dtype)
        if requires_grad and not is_floating(self.data.dtype):
            raise TypeError(
                f"tensor: only floating-point tensors can require gradients, "
                f"got {self.data.dtype}{tuple(self.data.shape)}"
            )
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None
        self._out_index = 0

    @classmethod
    def _make(cls, data, requires_grad, ctx, out_index):
        """Fast path used by ops: wrap an array that is already the right type."""
        t = object.__new__(Tensor)
        t.data = data
        t.grad = None
        t.requires_grad = requires_grad
        t._ctx = ctx
        t._out_index = out_index
        return t

    # ------------------------------------------------------------ attributes
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return int(self.data.size)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(backend.to_numpy(self.data), separator=", ", threshold=20)
        return f"tensor({body}, dtype={self.dtype}{dev}{grad})"

    # ------------------------------------------------------- conversions
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU if needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item: only one-element tensors convert to a number, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """Same data, cut from the graph."""
        return Tensor._make(self.data, False, None, 0)

    def to(self, device) -> "Tensor":
        """A copy on `device` ("cpu" or "cuda"); the graph follows the copy."""
        if backend.check_device(device) == self.device:
            return self
        return _ops.ToDevice.apply(self, device=backend.check_device(device))

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def astype(self, dtype) -> "Tensor":
        return _ops.Cast.apply(self, dtype=as_dtype(dtype))

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and not is_floating(self.data.dtype):
            raise TypeError(f"requires_grad_: {self.dtype} tensors cannot require gradients")
        self.requires_grad = flag
        return self

    # ------------------------------------------------------------ backward
    def backward(self, grad=None, retain_graph: bool = False):
        """Backpropagate from this tensor: fills `.grad` of the leaves it depends on."""
        if not self.requires_grad:
            raise RuntimeError(
                "backward: this tensor does not require grad (no input had "
                "requires_grad=True, or it was computed under no_grad())"
            )
        xp = backend.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward: output has shape {self.shape}; backward() without a "
                    "gradient needs a single-element output (call .sum() or .mean() "
                    "first, or pass grad=)"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward: grad has shape {grad.shape}, tensor has {self.shape}")
        _engine.backward(self, grad, retain_graph)

    # ------------------------------------------------------------ operators
    def __add__(self, other):
        return _ops.Add.apply(self, other)

    def __radd__(self, other):
        return _ops.Add.apply(other, self)

    def __sub__(self, other):
        return _ops.Sub.apply(self, other)

    def __rsub__(self, other):
        return _ops.Sub.apply(other, self)

    def __mul__(self, other):
        return _ops.Mul.apply(self, other)

    def __rmul__(self, other):
        return _ops.Mul.apply(other, self)

    def __truediv__(self, other):
        return _ops.Div.apply(self, other)

    def __rtruediv__(self, other):
        return _ops.Div.apply(other, self)

    def __neg__(self):
        return _ops.Neg.apply(self)

    def __pow__(self, exponent):
        return _ops.Pow.apply(self, exponent)

    def __rpow__(self, base):
        return _ops.Pow.apply(base, self)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __getitem__(self, index):
        return _ops.getitem(self, index)

    # Comparisons give boolean tensors (no gradient), as in NumPy.
    def __lt__(self, other):
        return Tensor._make(self.data < _data(other), False, None, 0)

    def __le__(self, other):
        return Tensor._make(self.data <= _data(other), False, None, 0)

    def __gt__(self, other):
        return Tensor._make(self.data > _data(other), False, None, 0)

    def __ge__(self, other):
        return Tensor._make(self.data >= _data(other), False, None, 0)

    def eq(self, other):
        return Tensor._make(self.data == _data(other), False, None, 0)

    __hash__ = object.__hash__

    # ----------------------------------------------------------- elementwise
    def exp(self):
        return _ops.Exp.apply(self)

    def log(self):
        return _ops.Log.apply(self)

    def sqrt(self):
        return _ops.Sqrt.apply(self)

    def abs(self):
        return _ops.Abs.apply(self)

    def tanh(self):
        return _ops.Tanh.apply(self)

    def sigmoid(self):
        return _ops.Sigmoid.apply(self)

    def relu(self):
        return _ops.Relu.apply(self)

    # ------------------------------------------------------------ reductions
    def sum(self, axis=None, keepdims=False):
        return _ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def var(self, axis=None, keepdims=False, ddof=0):
        return _ops.Var.apply(self, axis=axis, keepdims=keepdims, ddof=ddof)

    def max(self, axis=None, keepdims=False):
        return _ops.Max.apply(self, axis=axis, keepdims=keepdims)

    def min(self, axis=None, keepdims=False):
        return _ops.Min.apply(self, axis=axis, keepdims=keepdims)

    def logsumexp(self, axis=-1, keepdims=False):
        return _ops.LogSumExp.apply(self, axis=axis, keepdims=keepdims)

    def cumsum(self, axis=-1):
        return _ops.Cumsum.apply(self, axis=axis)

    def argmax(self, axis=None):
        return _ops.argmax(self, axis)

    def argmin(self, axis=None):
        return _ops.argmin(self, axis)

    # ----------------------------------------------------------------- shape
    def reshape(self, *shape):
        return _ops.reshape(self, *shape)

    def view(self, *shape):
        return _ops.reshape(self, *shape)

    def flatten(self):
        return _ops.reshape(self, -1)

    def transpose(self, *axes):
        return _ops.transpose(self, *axes)

    def permute(self, *axes):
        return _ops.transpose(self, *axes)

    def swapaxes(self, axis1, axis2):
        return _ops.swapaxes(self, axis1, axis2)

    @property
    def T(self):
        return _ops.transpose(self)

    def broadcast_to(self, shape):
        return _ops.BroadcastTo.apply(self, shape=tuple(shape))

    def squeeze(self, axis=None):
        return _ops.squeeze(self, axis)

    def unsqueeze(self, axis):
        return _ops.unsqueeze(self, axis)

    def expand_dims(self, axis):
        return _ops.unsqueeze(self, axis)

    def split(self, sections, axis=0):
        return _ops.split(self, sections, axis)

    def masked_fill(self, mask, value):
        return _ops.masked_fill(self, mask, value)


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _as_array(data, device, dtype):
    """Make the array of a new Tensor: Python floats become float32 (PyTorch's
    default), NumPy/CuPy arrays keep their dtype unless `dtype` is given."""
    if isinstance(data, Tensor):
        data = data.data
    if device is None:
        device = backend.device_of(data)
    xp = backend.module_for(device)
    if backend.is_cupy_array(data) and device == "cpu":
        data = backend.to_numpy(data)
    if dtype is None and not hasattr(data, "dtype"):
        arr = np.asarray(data)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return xp.asarray(arr)
    return xp.asarray(data, dtype=dtype)


# Bound at the end to break the import cycle (ops import Function, which imports Tensor).
from . import engine as _engine  # noqa: E402
from . import ops as _ops  # noqa: E402
