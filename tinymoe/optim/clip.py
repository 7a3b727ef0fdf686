"""Global gradient-norm clipping (Pascanu et al., 2013).

    norm = sqrt(sum over all parameters of sum(grad^2))
    if norm > max_norm:  grad = grad * max_norm / norm      (every gradient, same factor)

Two forms:
- `clip_grad_norm_(params, max_norm) -> float`: the norm as a Python float (a device sync
  on a GPU), for scripts that print it.
- `grad_norm(params)` then `scale_grads_(params, norm, max_norm)`: the norm stays a 0-d
  array on the gradients' device and the factor is applied there, so a GPU step never
  waits (tinymoe/step/eager.py). When the gradients live in one flat buffer (a fused
  optimizer's, tinymoe/optim/flat.py) on a GPU, that is 2 launches for the norm (float64
  partial sums in a fixed order, kernels/optim.py) and 1 for the scaling, instead of a few
  per parameter: what a captured CUDA graph replays.
"""
from __future__ import annotations

import math

from .. import backend
from .flat import flat_of


def clip_grad_norm_(params, max_norm: float, eps: float = 1e-6) -> float:
    """Scale all gradients in place so their joint L2 norm is at most `max_norm`;
    returns the norm before clipping (a float: log it to spot spikes)."""
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float(backend.array_module(g).vdot(g, g).real) for g in grads))
    scale = max_norm / (total + eps)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total


def _flat_gpu_grad(params):
    """The flat gradient buffer holding exactly these parameters' gradients, on a GPU; or None."""
    flat = flat_of(params)
    return flat.grad if flat is not None and backend.is_cupy_array(flat.grad) else None


def grad_norm(params):
    """||g|| = sqrt(sum over parameters of sum(g^2)), as a 0-d array on the gradients' device:
    no host read, so a GPU step does not wait for it. Parameters without a gradient count 0.
    (float64 from the flat-buffer kernels, the gradients' dtype otherwise.)"""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("grad_norm: no parameter has a gradient (call backward first)")
    flat = _flat_gpu_grad(params)
    if flat is not None:
        from ..kernels import optim as kernels
        return kernels.norm(flat)
    xp = backend.array_module(grads[0])
    squares = xp.stack([xp.vdot(g.ravel(), g.ravel()) for g in grads])   # (n_params,)
    return xp.sqrt(squares.sum())


def scale_grads_(params, norm, max_norm: float, eps: float = 1e-6) -> None:
    """Clip in place by a norm that stays on the device: g = g * min(1, max_norm / (norm + eps))."""
    if max_norm <= 0:
        raise ValueError(f"scale_grads_: max_norm must be > 0, got {max_norm}")
    params = list(params)
    flat = _flat_gpu_grad(params)
    if flat is not None:
        from ..kernels import optim as kernels
        kernels.clip_by_norm_(flat, norm, max_norm, eps)
        return
    xp = backend.array_module(norm)
    factor = xp.minimum(max_norm / (norm + eps), 1.0)
    for p in params:
        if p.grad is not None:
            p.grad *= factor.astype(p.grad.dtype)
