"""`Function`: one differentiable op = a forward on arrays + its derivative.

    class Exp(Function):
        @staticmethod
        def forward(ctx, x):          # arrays in, array(s) out
            y = array_module(x).exp(x)
            ctx.save(y)
            return y

        @staticmethod
        def backward(ctx, grad):      # dL/dy in, one dL/d(input) per input out
            (y,) = ctx.saved
            return grad * y           # d exp(x)/dx = exp(x)

    y = Exp.apply(x)                  # Tensors in, Tensor out, graph recorded

The `Context` made for each call is also the graph node: it remembers the input
Tensors (its parents), the arrays saved for backward, and which op it belongs to.
"""
from __future__ import annotations

import time

from .. import backend
from ..dtypes import is_floating
from .grad_mode import _GradMode
from .tensor import Tensor


class Context:
    """What one call of an op remembers for its backward (and the graph node)."""

    __slots__ = ("fn", "inputs", "saved", "needs_input_grad", "records", "n_outputs", "freed",
                 "__dict__")

    def save(self, *arrays):
        self.saved = arrays


# ------------------------------------------------------------------- op hooks
_op_hooks = []


class OpEvent:
    """What an op hook sees: one forward or backward of one Function.

    `ctx` is the node's Context, the same object in the forward and in its backward, so a
    hook can tag it in the forward (e.g. with the module that ran it) and read it back."""

    __slots__ = ("op", "phase", "inputs", "outputs", "params", "seconds", "ctx")

    def __init__(self, op, phase, inputs, outputs, params, seconds, ctx):
        self.op, self.phase, self.inputs = op, phase, inputs
        self.outputs, self.params, self.seconds, self.ctx = outputs, params, seconds, ctx


class _HookHandle:
    def __init__(self, hook):
        self.hook = hook

    def remove(self):
        if self.hook in _op_hooks:
            _op_hooks.remove(self.hook)


def add_op_hook(hook) -> _HookHandle:
    """Call `hook(event: OpEvent)` after every op's forward and backward (profiling)."""
    _op_hooks.append(hook)
    return _HookHandle(hook)


def _run_hooks(op, phase, inputs, outputs, params, seconds, ctx):
    event = OpEvent(op, phase, inputs, outputs, params, seconds, ctx)
    for hook in list(_op_hooks):
        hook(event)


# --------------------------------------------------------------------- errors
def op_error(op: str, message: str, kind=ValueError) -> Exception:
    """An error that names the op; `apply` lets it through unchanged."""
    err = kind(f"{op}: {message}")
    err._tinymoe = True
    return err


def _describe(arrays) -> str:
    parts = []
    for a in arrays:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            parts.append(f"{backend.device_of(a)} {a.dtype}{tuple(a.shape)}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def _check_devices(op, arrays):
    """A CPU array meeting a GPU array is the user's mistake: say so clearly."""
    devices = {backend.device_of(a) for a in arrays if hasattr(a, "shape")}
    if len(devices) > 1:
        raise op_error(
            op,
            f"inputs are on different devices ({_describe(arrays)}); "
            "move them with .to('cuda') or .to('cpu') first",
            RuntimeError,
        )


class Function:
    """Base class of every differentiable op (see the module docstring)."""

    # Input positions whose Tensors must hold floats (None = all Tensor inputs).
    # Ops that also do integer arithmetic (add, mul, indexing) set this to ().
    float_inputs = None

    @staticmethod
    def forward(ctx, *arrays, **params):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params):
        arrays = []
        needs_grad = []
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
                needs_grad.append(x.requires_grad)
            else:
                arrays.append(x)
                needs_grad.append(False)
        if backend._cupy is not None:
            _check_devices(cls.__name__, arrays)
        positions = range(len(inputs)) if cls.float_inputs is None else cls.float_inputs
        for i in positions:
            x = inputs[i]
            if isinstance(x, Tensor) and not is_floating(x.data.dtype):
                raise op_error(
                    cls.__name__,
                    f"expected a floating-point tensor as input {i}, got "
                    f"{x.data.dtype}{tuple(x.shape)}; convert it with .float() or .double()",
                    TypeError,
                )

        record = _GradMode.enabled and any(needs_grad)
        ctx = Context()
        ctx.fn = cls
        ctx.needs_input_grad = needs_grad
        ctx.records = record  # a backward can follow: forwards that keep extra state ask this
        ctx.saved = ()
        start = time.perf_counter() if _op_hooks else 0.0
        try:
            out = cls.forward(ctx, *arrays, **params)
        except (ValueError, TypeError, IndexError) as err:
            if getattr(err, "_tinymoe", False):
                raise
            raise type(err)(f"{cls.__name__}: {err} (inputs: {_describe(arrays)})") from err
        if _op_hooks:
            outs = out if isinstance(out, tuple) else (out,)
            _run_hooks(cls.__name__, "forward", arrays, outs, params,
                       time.perf_counter() - start, ctx)

        if record:
            ctx.inputs = inputs
            ctx.freed = False
        else:
            ctx = None
        if isinstance(out, tuple):
            if ctx is not None:
                ctx.n_outputs = len(out)
                ctx.output_shapes = [o.shape for o in out]
                ctx.output_dtypes = [o.dtype for o in out]
                ctx.xp = backend.array_module(out[0])
            return tuple(
                Tensor._make(o, ctx is not None and is_floating(o.dtype), ctx, i)
                for i, o in enumerate(out)
            )
        if ctx is not None:
            ctx.n_outputs = 1
        return Tensor._make(out, record and is_floating(out.dtype), ctx, 0)
