"""Global gradient-norm clipping (Pascanu et al., 2013).

    norm = sqrt(sum over all parameters of sum(grad^2))
    if norm > max_norm:  grad = grad * max_norm / norm      (every gradient, same factor)
"""
from __future__ import annotations

import math

from .. import backend


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


def grad_norm(params):
    """||g|| = sqrt(sum over parameters of sum(g^2)), as a 0-d array on the gradients' device:
    no host read, so a GPU step does not wait for it. Parameters without a gradient count 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("grad_norm: no parameter has a gradient (call backward first)")
    xp = backend.array_module(grads[0])
    squares = xp.stack([xp.vdot(g.ravel(), g.ravel()) for g in grads])   # (n_params,)
    return xp.sqrt(squares.sum())


def scale_grads_(params, norm, max_norm: float, eps: float = 1e-6) -> None:
    """Clip in place by a norm that stays on the device: g = g * min(1, max_norm / (norm + eps))."""
    if max_norm <= 0:
        raise ValueError(f"scale_grads_: max_norm must be > 0, got {max_norm}")
    xp = backend.array_module(norm)
    factor = xp.minimum(max_norm / (norm + eps), 1.0)
    for p in params:
        if p.grad is not None:
            p.grad *= factor.astype(p.grad.dtype)
