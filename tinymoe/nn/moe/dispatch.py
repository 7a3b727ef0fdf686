"""Dispatch and combine as autograd Functions over the array kernels (tinymoe/kernels/dispatch).

    xs  = Permute.apply(x, plan=plan)              x (T, d) -> xs (R, d), expert-contiguous rows
    out = Combine.apply(ys, weights, plan=plan)    ys (R, d), weights (T, k) -> out (T, d)

The plan (who goes where) is computed once from the router's discrete choice; it has no
gradient. Gradients flow to the tokens (through Permute) and to the expert outputs and
the gate weights (through Combine).
"""
from __future__ import annotations

from ...autograd.function import Function
from ...kernels import dispatch as kernels


class Permute(Function):
    """xs[r] = x[row_token[r]];  dL/dx[t] = sum over the rows r of token t of dL/dxs[r]"""

    @staticmethod
    def forward(ctx, x, plan, impl=None):
        ctx.plan, ctx.impl, ctx.num_tokens = plan, impl, x.shape[0]
        return kernels.permute(x, plan, impl=impl)

    @staticmethod
    def backward(ctx, grad):
        return kernels.permute_backward(grad, ctx.plan, ctx.num_tokens, impl=ctx.impl)


class Combine(Function):
    """out[t] = sum_j w[t, j] ys[slot_row[t, j]];
    dL/dys[r] = w[t, j] dL/dout[t],  dL/dw[t, j] = dL/dout[t] . ys[slot_row[t, j]]"""

    @staticmethod
    def forward(ctx, ys, weights, plan, impl=None):
        ctx.plan, ctx.impl = plan, impl
        ctx.save(ys, weights)
        return kernels.combine(ys, weights, plan, impl=impl)

    @staticmethod
    def backward(ctx, grad):
        ys, weights = ctx.saved
        return kernels.combine_backward(grad, ys, weights, ctx.plan, impl=ctx.impl)


def permute(x, plan, impl=None):
    return Permute.apply(x, plan=plan, impl=impl)


def combine(ys, weights, plan, impl=None):
    return Combine.apply(ys, weights, plan=plan, impl=impl)
