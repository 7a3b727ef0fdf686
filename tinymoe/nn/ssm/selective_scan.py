"""`selective_scan`: the selective SSM (Mamba's S6) as one differentiable op.

The forward and the backward are the kernels of tinymoe/kernels/selective_scan/
(reference loop, associative scan, Numba CPU, GPU kernels); this file only connects
them to autograd. Nothing of size (batch, d_inner, L, N) is saved: the backward
recomputes the states from the inputs (the GPU kernels from the state at the start of
every tile of 256 steps, which their forward keeps: 1/256 of the states).
"""
from __future__ import annotations

from ...autograd.function import Function
from ...kernels import selective_scan as kernels


class SelectiveScan(Function):
    """out = scan(u, delta, A, B, C, D, z, delta_bias)  (see kernels/selective_scan)

        h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t,   y_t = C_t . h_t + D u_t,
        out_t = y_t * silu(z_t)
    backward: selective_scan_bwd, the reverse recurrence g_t = dA_{t+1} g_{t+1} + dy_t C_t.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                delta_softplus=False, impl=None):
        if not ctx.records:                                       # no backward will come
            return kernels.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                              delta_softplus, impl)
        out, states = kernels.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                 delta_softplus, impl, return_states=True)
        ctx.save(u, delta, A, B, C, D, z, delta_bias, states)    # inputs; tile-start states or None
        ctx.delta_softplus, ctx.impl = delta_softplus, impl
        return out

    @staticmethod
    def backward(ctx, dout):
        *inputs, states = ctx.saved
        grads = kernels.selective_scan_bwd(dout, *inputs, ctx.delta_softplus, ctx.impl,
                                           states=states)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, impl=None):
    """The selective scan on Tensors (or arrays): out (batch, d_inner, L).

    u, delta, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L);
    D, delta_bias: (d_inner,). delta' = softplus(delta + delta_bias) when
    delta_softplus. `impl` picks the kernel ("reference", "assoc", "numba", ...).
    """
    return SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias,
                               delta_softplus=delta_softplus, impl=impl)
