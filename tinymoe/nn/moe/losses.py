"""Auxiliary losses of the routers: they keep the experts evenly loaded.

- Switch / GShard load balancing (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020):
      L_lb = E * sum_i f_i P_i,   f_i = fraction of tokens sent to expert i (counted, constant)
                                  P_i = mean over tokens of the router probability p_i(x)
  An expert with f_i = P_i = p contributes E p^2; a perfectly balanced router (p = 1/E for
  all i) gives exactly 1, the minimum.
- Shazeer et al. 2017, eq. 6-10: importance and load losses, each w * CV(v)^2, the squared
  coefficient of variation  CV(v)^2 = Var(v) / Mean(v)^2  of a per-expert vector v.
- Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of (log sum_i e^{z_i})^2,
  keeps the logits small so the softmax stays in float32 range.
"""
from __future__ import annotations

import math

from ...autograd.function import Function, op_error
from ...backend import array_module, is_cupy_array


def load_balancing_loss(probs, expert_index, num_experts: int):
    """probs (T, E) Tensor, expert_index (T, k) int array (-1 = empty slot) -> scalar Tensor.

    f_i counts the slots routed to expert i (before capacity, as in Switch), divided by the
    number of real slots; the gradient flows through P_i only (f_i is a count).
    """
    xp = array_module(expert_index)
    if probs.shape[-1] != num_experts:
        raise op_error("load_balancing_loss", f"probs {probs.shape} must have {num_experts} experts")
    # Counted by comparing every slot with every expert (empty slots match none), not with
    # bincount or boolean indexing: their result sizes would cost a device sync on a GPU.
    chose = expert_index.reshape(-1, 1) == xp.arange(num_experts)         # (T k, E)
    counts = chose.sum(axis=0)                                             # (E,)
    f = counts / xp.maximum(counts.sum(), 1)                               # (E,)
    return LoadBalancingLoss.apply(probs, f.astype(probs.dtype))


class LoadBalancingLoss(Function):
    """L = E * sum_i f_i P_i,  P_i = mean_t p_ti;   dL/dp_ti = E f_i / T   (f is a constant).
    One op (instead of mean, multiply, sum, scale): the router runs it every step."""

    @staticmethod
    def forward(ctx, probs, f):
        T, E = probs.shape
        ctx.shape, ctx.scale = probs.shape, f * (E / max(T, 1))           # (E,) dL/dp_t.
        return E * (probs.mean(axis=0) * f).sum()

    @staticmethod
    def backward(ctx, grad):
        xp = array_module(grad)
        return xp.broadcast_to(grad * ctx.scale, ctx.shape).copy(), None  # (T, E)


def cv_squared(v, eps: float = 1e-10):
    """Squared coefficient of variation Var(v) / (Mean(v)^2 + eps) of a vector Tensor (E,)."""
    if v.shape[0] <= 1:
        return v.sum() * 0.0                                               # one expert: no spread
    mean = v.mean()
    return v.var() / (mean * mean + eps)


def importance_loss(gates):
    """Shazeer eq. 6-7: Importance(X) = sum over tokens of the gate vector G(x); CV^2 of it."""
    return cv_squared(gates.sum(axis=0))


def load_loss(prob_in_topk):
    """Shazeer eq. 8-10: Load(X)_i = sum_x P(x, i), the smooth expected token count; CV^2."""
    return cv_squared(prob_in_topk.sum(axis=0))


def z_loss(logits):
    """ST-MoE: mean over tokens of (logsumexp of the router logits)^2."""
    return ZLoss.apply(logits)


class ZLoss(Function):
    """L = mean_t lse_t^2,  lse_t = log sum_i e^{z_ti};
    dL/dz_ti = 2 lse_t / T * d lse_t / dz_ti = 2 lse_t softmax(z_t)_i / T"""

    @staticmethod
    def forward(ctx, logits):
        xp = array_module(logits)
        m = logits.max(axis=-1, keepdims=True)                             # (T, 1), for stability
        e = xp.exp(logits - m)                                             # (T, E)
        s = e.sum(axis=-1, keepdims=True)
        lse = m + xp.log(s)                                                # (T, 1)
        ctx.save(e / s, lse)                                               # softmax, lse
        return (lse * lse).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, lse = ctx.saved
        return grad * (2 / max(softmax.shape[0], 1)) * lse * softmax


class NormalCDF(Function):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2;  dPhi/dx = exp(-x^2/2) / sqrt(2 pi)"""

    @staticmethod
    def forward(ctx, x):
        if is_cupy_array(x):
            from cupyx.scipy.special import ndtr
        else:
            from scipy.special import ndtr
        ctx.save(x)
        return ndtr(x).astype(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = array_module(x)
        return grad * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def normal_cdf(x):
    return NormalCDF.apply(x)
