"""Experts as stacked weights, run as one grouped computation over expert-contiguous rows.

Expert e is the FFN  f_e(x) = act(x W1[e]) W2[e]  (or SwiGLU: (silu(x W1[e]) * x W3[e]) W2[e]),
with W1 (E, d, f), W2 (E, f, d). After dispatch, expert e's tokens are the rows
offsets[e] : offsets[e+1] of xs, so each expert is one dense matmul over its block.
"""
from __future__ import annotations

import math

from ... import backend
from ...autograd.function import Function, op_error
from .. import functional as F
from ..module import Module
from ..parameter import Parameter


class GroupedLinear(Function):
    """ys[rows of e] = xs[rows of e] @ W[e]   for every expert e;
    dL/dxs[rows of e] = dL/dys[rows] @ W[e]^T,  dL/dW[e] = xs[rows]^T @ dL/dys[rows]"""

    @staticmethod
    def forward(ctx, xs, W, offsets):
        if xs.shape[-1] != W.shape[1]:
            raise op_error("grouped_linear", f"rows have {xs.shape[-1]} features, weights "
                           f"{tuple(W.shape)} expect {W.shape[1]}")
        xp = backend.array_module(xs)
        ctx.save(xs, W)
        ctx.bounds = [int(o) for o in backend.to_numpy(offsets)]
        ys = xp.empty((xs.shape[0], W.shape[2]), dtype=xp.result_type(xs, W))  # (R, out)
        for e, (a, b) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            if b > a:
                ys[a:b] = xs[a:b] @ W[e]
        return ys

    @staticmethod
    def backward(ctx, grad):
        xs, W = ctx.saved
        gx, gw, _ = ctx.needs_input_grad
        xp = backend.array_module(grad)
        dxs = xp.empty_like(xs) if gx else None
        dW = xp.zeros_like(W) if gw else None
        for e, (a, b) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            if b > a:
                if gx:
                    dxs[a:b] = grad[a:b] @ W[e].T
                if gw:
                    dW[e] = xs[a:b].T @ grad[a:b]
        return dxs, dW, None


def grouped_linear(xs, W, offsets):
    """xs (R, in), W (E, in, out), offsets (E+1,) -> (R, out)."""
    return GroupedLinear.apply(xs, W, offsets)


class Experts(Module):
    """E feed-forward experts with stacked weights w1 (E, d, f), w2 (E, f, d) [, w3 (E, d, f)]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu",
                 device: str = "cpu", dtype=None):
        super().__init__()
        if activation not in ("gelu", "swiglu", "relu"):
            raise ValueError(f"Experts: activation must be 'gelu', 'swiglu' or 'relu', got {activation!r}")
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        dtype = dtype or backend.default_float_dtype()
        rng = backend.rng(device)

        def init(shape, fan_in):  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
            return Parameter((2 * rng.random(shape, dtype=dtype) - 1) / math.sqrt(fan_in))

        self.w1 = init((num_experts, d_model, d_ff), d_model)
        self.w2 = init((num_experts, d_ff, d_model), d_ff)
        if activation == "swiglu":
            self.w3 = init((num_experts, d_model, d_ff), d_model)

    def forward(self, xs, offsets):
        # xs (R, d) expert-contiguous, offsets (E+1,) -> (R, d)
        h = grouped_linear(xs, self.w1, offsets)                              # (R, f)
        if self.activation == "swiglu":
            h = F.silu(h) * grouped_linear(xs, self.w3, offsets)              # Shazeer 2020
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return grouped_linear(h, self.w2, offsets)                            # (R, d)

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}")
