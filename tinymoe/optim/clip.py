"""Global gradient-norm clipping (Pascanu et al., 2013).

    norm = sqrt(sum over all parameters of sum(grad^2))
    if norm > max_norm:  grad = grad * max_norm / norm      (every gradient, same factor)

Two forms:
- `clip_grad_norm_(params, max_norm) -> float`: the norm as a Python float (a device sync
  on a GPU), for scripts that print it.
- `clip_grads_(params, max_norm) -> (norm, found_inf)`: 0-d arrays that stay where the
  gradients are. On a GPU nothing waits: the norm, the factor and the flag are computed and
  applied by kernels (tinymoe/kernels/optim.py), so a captured CUDA graph replays them;
  found_inf (the norm is inf or nan) tells the optimizer to skip the update.
"""
from __future__ import annotations

import math

import numpy as np

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


def clip_grads_(params, max_norm: float | None, eps: float = 1e-6):
    """Clip like clip_grad_norm_ (max_norm None: only measure), without leaving the device.
    Returns (norm, found_inf): a 0-d float64 array and a 0-d bool array on the gradients'
    device. The sum of squares is taken in float64."""
    if max_norm is not None and max_norm <= 0:
        raise ValueError(f"clip_grads_: max_norm must be > 0 or None, got {max_norm}")
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("clip_grads_: no parameter has a gradient")
    flat = flat_of(params)
    if flat is not None:
        grads = [flat.grad]                                         # one buffer: 3 launches
    if backend.is_cupy_array(grads[0]):
        from ..kernels import optim as kernels

        norm, scale, found_inf = kernels.clip_scale(grads, max_norm, eps)
        if max_norm is not None:
            for g in grads:
                kernels.scale_(g, scale)
        return norm, found_inf
    # The NumPy spec of the kernels.
    norm = np.sqrt(sum(np.vdot(g.astype(np.float64).ravel(), g.astype(np.float64).ravel()) for g in grads))
    norm = np.asarray(norm, dtype=np.float64)
    if max_norm is not None:
        scale = min(1.0, max_norm / (float(norm) + eps))             # g * 1.0 == g: no branch
        with np.errstate(invalid="ignore"):                            # nan: found_inf says so
            for g in grads:
                g *= scale
    return norm, np.asarray(not np.isfinite(norm))
