"""`gradcheck`: compare an op's analytic gradients with central finite differences.

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

for EVERY entry i of every input that requires grad, in float64. For a non-scalar
output, L = sum(out * r) with a fixed random r, so every output entry matters.
Public API: check your own ops with it.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import is_floating
from .grad_mode import no_grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    pass


def _outputs(result):
    outs = result if isinstance(result, (tuple, list)) else (result,)
    return [o for o in outs if isinstance(o, Tensor) and is_floating(o.dtype)]


def _op_name(result) -> str:
    for o in _outputs(result):
        if o._ctx is not None:
            return o._ctx.fn.__name__
    return "function"


def gradcheck(f, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5, raise_exception: bool = True, seed: int = 0):
    """Check d f(*inputs) / d inputs. Returns {input index: worst relative error}.

    Raises GradcheckError naming the op and the input when an entry differs by more
    than atol + rtol * |numeric|. Inputs that require grad must be float64.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; use float64 for finite differences")

    result = f(*inputs)
    outs = _outputs(result)
    op = getattr(f, "__name__", None)
    op = _op_name(result) if op in (None, "<lambda>") else op
    rng = np.random.default_rng(seed)
    weights = [backend.to_device(rng.standard_normal(o.shape), o.device) for o in outs]

    def scalar_loss():
        with no_grad():
            return sum(float((o.data * w).sum()) for o, w in zip(_outputs(f(*inputs)), weights))

    # Analytic: backpropagate r through every output.
    for i in checked:
        inputs[i].grad = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            o.backward(w, retain_graph=True)

    report = {}
    for i in checked:
        x = inputs[i]
        x.data = backend.array_module(x.data).ascontiguousarray(x.data)
        analytic = backend.to_numpy(x.grad) if x.grad is not None else np.zeros(x.shape)
        numeric = np.zeros(x.shape)
        flat = x.data.reshape(-1)  # a view: perturbing it perturbs x
        for j in range(flat.size):
            old = float(flat[j])
            flat[j] = old + eps
            plus = scalar_loss()
            flat[j] = old - eps
            minus = scalar_loss()
            flat[j] = old
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        err = np.abs(analytic - numeric)
        rel = err / (np.abs(numeric) + atol / rtol)
        report[i] = float(rel.max()) if rel.size else 0.0
        bad = err > atol + rtol * np.abs(numeric)
        if raise_exception and bad.any():
            k = int(np.argmax(err - (atol + rtol * np.abs(numeric))))
            idx = np.unravel_index(k, x.shape) if x.shape else ()
            raise GradcheckError(
                f"gradcheck failed for {op}, input {i} of shape {x.shape}: at {idx} analytic "
                f"{analytic.reshape(-1)[k]:.8g} vs numeric {numeric.reshape(-1)[k]:.8g} "
                f"(worst relative error {report[i]:.3g}, {int(bad.sum())} of {bad.size} entries off)"
            )
    return report
