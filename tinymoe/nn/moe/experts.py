"""Experts as stacked weights, run as one grouped computation over expert-contiguous rows.

Expert e is the FFN  f_e(x) = act(x W1[e]) W2[e]  (or SwiGLU: (silu(x W1[e]) * x W3[e]) W2[e]),
with W1 (E, d, f), W2 (E, f, d). After dispatch, expert e's tokens are the rows
offsets[e] : offsets[e+1] of xs, so each expert is one dense matmul over its block.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ... import backend
from ...autograd.function import Function, op_error
from ...dtypes import is_half
from ...kernels import grouped_gemm
from ...kernels.matmul import matmul as mm         # 16-bit aware; cuBLAS directly while capturing
from ...kernels.matmul import same_format
from .. import functional as F
from ..module import Module
from ..parameter import Parameter

# GroupedLinear runs as ONE batched matmul over the experts padded to the largest group M
# when each expert's product is small (M * in * out <= BATCHED_MAX_MACS) and the padding adds
# at most BATCHED_MAX_PADDING - 1 of the rows (E M <= BATCHED_MAX_PADDING R); otherwise as a
# loop of one matmul per expert. Small products are bound by the host cost of each launch
# (~30 us on the GPU, more than a 2^27-MAC matmul takes there), so 1 + 2 launches beat 3 E;
# large ones run at full speed per expert, and padding them costs copies (on an H200 the
# loop took 11.3 ms, the batched form 14.5 ms at 8 experts x 4096 rows x 512 x 2048).
# The CPU has no launch cost to save, so there padding is pure overhead: it loops (the main
# job's training step took 270 ms looping, 300 ms batched) unless BATCHED_ON_CPU.
# The same holds in 16 bits, where the products are ~10x faster: at the shape above in
# bfloat16 the loop took 3.41 ms and the batched form 4.39 ms, 2 of them in the pad (scatter)
# and unpad (take) copies (H200, `python benchmarks/bench_moe.py`).
BATCHED_MAX_PADDING = 1.5          # 0: always loop
BATCHED_MAX_MACS = 2**27
BATCHED_ON_CPU = False


def host_bounds(offsets) -> tuple:
    """Row bounds (E+1,) as Python ints: a tuple/list as is, an array fetched (a device sync
    for a GPU array: pass DispatchPlan.bounds instead)."""
    if isinstance(offsets, (tuple, list)):
        return tuple(int(o) for o in offsets)
    return tuple(int(o) for o in backend.to_numpy(offsets))


@lru_cache(maxsize=8)
def _padded_rows(bounds: tuple, device: str):
    """Row r of expert e -> its row e * M + (r - bounds[e]) in the padded (E * M) buffer,
    M = the largest group. Cached: the experts' matmuls of one step share their bounds."""
    counts = np.diff(bounds)                                                  # (E,)
    M = int(counts.max())
    starts = np.arange(len(counts)) * M - np.asarray(bounds[:-1])             # (E,)
    pos = np.arange(bounds[-1]) + np.repeat(starts, counts)                   # (R,)
    return backend.to_device(pos, device), M


def _pad(x, pos, E, M):
    """x (R, n) -> (E, M, n): row r at pos[r], zeros in the padding rows."""
    xp = backend.array_module(x)
    out = xp.zeros((E * M, x.shape[1]), dtype=x.dtype)
    out[pos] = x
    return out.reshape(E, M, x.shape[1])


class GroupedLinear(Function):
    """ys[rows of e] = xs[rows of e] @ W[e]   for every expert e;
    dL/dxs[rows of e] = dL/dys[rows] @ W[e]^T,  dL/dW[e] = xs[rows]^T @ dL/dys[rows]

    `bounds` are the row offsets (E+1,), as Python ints (DispatchPlan.bounds) or an array;
    rows after bounds[E] belong to no expert (a dropless static plan's padding) and map to 0.
    Offsets on the GPU with 16-bit rows and weights stay there: the grouped kernels read them
    (kernels/grouped_gemm.py; three launches, no device sync, capturable). A static plan's
    bounds are uniform (every expert M rows, row e*M + r): then the products
    are one batched matmul over xs seen as (E, M, in), nothing copied. Otherwise two ways to
    compute the same products (BATCHED_MAX_PADDING and _MACS pick):
      loop:    for each expert, one matmul over its rows, written in place (out=);
      batched: pad every expert's rows to M = the largest group, (E, M, in) @ (E, in, out)
               as one batched matmul, and take the real rows back out.
    """

    @staticmethod
    def forward(ctx, xs, W, bounds):
        if xs.shape[-1] != W.shape[1]:
            raise op_error("grouped_linear", f"rows have {xs.shape[-1]} features, weights "
                           f"{tuple(W.shape)} expect {W.shape[1]}")
        E, R = W.shape[0], xs.shape[0]
        xs, W = same_format(xs, W)                     # 16-bit rows and weights: a 16-bit product
        # bounds on the GPU (a dropless static plan's offsets) and 16-bit operands: the grouped
        # kernels read them there
        ctx.device = backend.is_cupy_array(bounds) and grouped_gemm.supports(xs, W)
        if ctx.device:
            if bounds.shape != (E + 1,):
                raise op_error("grouped_linear", f"bounds {tuple(bounds.shape)} must be {E + 1} offsets")
            ctx.save(xs, W, bounds.astype("int64", copy=False))
            return grouped_gemm.grouped_rows(xs, W, ctx.saved[2])                     # (R, out)
        bounds = host_bounds(bounds)
        if len(bounds) != E + 1 or bounds[0] != 0 or not bounds[-1] <= R:
            raise op_error("grouped_linear", f"bounds {bounds} must be {E + 1} offsets from 0 "
                           f"to at most the {R} rows of xs {tuple(xs.shape)}")
        xp = backend.array_module(xs)
        ctx.bounds = bounds
        M = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        ctx.uniform = 0 < R == E * M and bounds == tuple(range(0, R + 1, M))
        if ctx.uniform:                     # a static plan: E groups of M rows, (E, M, in) as is
            ctx.save(xs, W)
            return mm(xs.reshape(E, M, -1), W).reshape(R, W.shape[2])      # (R, out)
        ctx.batched = ((BATCHED_ON_CPU or backend.is_cupy_array(xs))
                       and 0 < R == bounds[-1] and E * M <= BATCHED_MAX_PADDING * R
                       and M * W.shape[1] * W.shape[2] <= BATCHED_MAX_MACS)
        if ctx.batched:
            pos, M = _padded_rows(bounds, backend.device_of(xs))
            xpad = _pad(xs, pos, E, M)                                        # (E, M, in)
            ctx.save(xpad, W, pos)
            return mm(xpad, W).reshape(E * M, W.shape[2])[pos]               # (R, out)
        ctx.save(xs, W)
        ys = xp.empty((R, W.shape[2]), dtype=xp.result_type(xs, W))          # (R, out)
        ys[bounds[-1]:] = 0                                                   # rows of no expert
        for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                mm(xs[a:b], W[e], out=ys[a:b])
        return ys

    @staticmethod
    def backward(ctx, grad):
        gx, gw, _ = ctx.needs_input_grad
        xp = backend.array_module(grad)
        grad = grad.astype(ctx.saved[1].dtype, copy=False)                   # W's format
        if ctx.device:
            xs, W, offsets = ctx.saved
            dxs = grouped_gemm.grouped_rows(grad, W, offsets, transpose=True) if gx else None
            dW = grouped_gemm.grouped_weights(xs, grad, offsets) if gw else None
            return dxs, dW, None
        if ctx.uniform:
            xs, W = ctx.saved
            E, n_in = W.shape[0], W.shape[1]
            g3 = grad.reshape(E, -1, grad.shape[-1])                            # (E, M, out)
            dxs = mm(g3, W.swapaxes(1, 2)).reshape(xs.shape) if gx else None
            dW = mm(xs.reshape(E, -1, n_in).swapaxes(1, 2), g3) if gw else None
            return dxs, dW, None
        if ctx.batched:
            xpad, W, pos = ctx.saved
            E, M, n_in = xpad.shape
            gpad = _pad(grad, pos, E, M)                                      # (E, M, out)
            dxs = mm(gpad, W.swapaxes(1, 2)).reshape(E * M, n_in)[pos] if gx else None
            dW = mm(xpad.swapaxes(1, 2), gpad) if gw else None                # (E, in, out)
            return dxs, dW, None
        xs, W = ctx.saved
        dxs = xp.empty(xs.shape, dtype=xp.result_type(grad, W)) if gx else None
        if gx:
            dxs[ctx.bounds[-1]:] = 0                                          # rows of no expert
        dW = xp.empty(W.shape, dtype=xp.result_type(xs, grad)) if gw else None
        for e, (a, b) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            if gx and b > a:
                mm(grad[a:b], W[e].T, out=dxs[a:b])
            if gw:
                if b > a:
                    mm(xs[a:b].T, grad[a:b], out=dW[e])
                else:
                    dW[e] = 0                                                 # no rows: no gradient
        return dxs, dW, None


def grouped_linear(xs, W, bounds):
    """xs (R, in), W (E, in, out), bounds (E+1,) row offsets (ints or an array) -> (R, out)."""
    return GroupedLinear.apply(xs, W, bounds)


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

    def forward(self, xs, bounds):
        # xs (R, d) expert-contiguous, bounds (E+1,) row offsets (DispatchPlan.bounds, or its
        # offsets on the device for a dropless static plan) -> (R, d)
        if not (backend.is_cupy_array(bounds) and self.reads_bounds_on_device(xs.dtype)):
            bounds = host_bounds(bounds)                                      # fetched once
        h = grouped_linear(xs, self.w1, bounds)                               # (R, f)
        if self.activation == "swiglu":
            h = F.silu(h) * grouped_linear(xs, self.w3, bounds)               # Shazeer 2020
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return grouped_linear(h, self.w2, bounds)                             # (R, d)

    def reads_bounds_on_device(self, dtype) -> bool:
        """True when, on the GPU, rows of `dtype` let these experts take a dropless static plan's
        offsets on the device (16-bit weights or rows; d_model and d_ff multiples of 8: the
        operands kernels/grouped_gemm.py :: supports takes once same_format has made them one
        16-bit format)."""
        return ((is_half(dtype) or is_half(self.w1.dtype)) and self.d_model % 8 == 0
                and self.d_ff % 8 == 0)

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}")
