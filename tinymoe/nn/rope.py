"""Rotary position embeddings, RoPE (Su et al. 2021, RoFormer, Sec. 3.4.2), in the half-split
layout of GPT-NeoX, Llama and Mixtral.

A head vector x (d_head,) at position m is rotated pair by pair: channels i and i + d/2 form
the pair (x_i, x_{i+d/2}), turned by the angle m theta_i, theta_i = base^(-2i / d):

    y = x * cos(m theta) + rotate_half(x) * sin(m theta),      rotate_half([x1, x2]) = [-x2, x1]

A rotation by m theta of q and by n theta of k leaves q_m . k_n a function of m - n alone:
attention sees relative positions, and no position table is learned.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .. import backend
from ..autograd.function import Function, op_error
from ..dtypes import as_dtype


@lru_cache(maxsize=32)
def rope_angles(start: int, length: int, d_head: int, base: float, dtype: str, device: str):
    """(cos, sin), each (length, d_head), for positions start .. start + length - 1.
    Computed in float64 on the host, then cast: the angles m theta_i reach m radians, and
    float32 angles would lose their last digits at large m."""
    if d_head % 2:
        raise op_error("rope", f"d_head={d_head} must be even (channels rotate in pairs)")
    theta = 1.0 / base ** (np.arange(0, d_head, 2, dtype=np.float64) / d_head)    # (d/2,)
    m = np.arange(start, start + length, dtype=np.float64)                         # (L,)
    angles = np.outer(m, theta)                                                    # (L, d/2)
    angles = np.concatenate([angles, angles], axis=1)                              # (L, d)
    cos, sin = (backend.to_device(f(angles).astype(as_dtype(dtype)), device) for f in (np.cos, np.sin))
    return cos, sin


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (a 90-degree turn of every pair)."""
    xp = backend.array_module(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_half_transposed(g):
    """The transpose of rotate_half: [g1, g2] -> [g2, -g1] (a turn the other way)."""
    xp = backend.array_module(g)
    half = g.shape[-1] // 2
    return xp.concatenate([g[..., half:], -g[..., :half]], axis=-1)


class Rotary(Function):
    """y = x cos + rotate_half(x) sin;   dL/dx = g cos + rotate_half^T(g sin)
    x (..., L, d_head); cos, sin (L, d_head) constants (rope_angles)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        if x.shape[-2:] != cos.shape:
            raise op_error("rope", f"x {tuple(x.shape)} needs angles for its last two axes, "
                           f"got {tuple(cos.shape)}")
        ctx.save(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved
        return grad * cos + rotate_half_transposed(grad * sin), None, None


def apply_rope(x, start: int = 0, base: float = 10000.0):
    """Rotate x (..., L, d_head), a Tensor of queries or keys at positions start .. start+L-1."""
    cos, sin = rope_angles(start, x.shape[-2], x.shape[-1], float(base), x.dtype.name,
                           backend.device_of(x.data))
    return Rotary.apply(x, cos, sin)
