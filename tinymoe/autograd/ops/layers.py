"""Ops of neural-network layers: embedding lookup, dropout, causal depthwise conv1d."""
from ... import backend
from ...dtypes import accumulation_dtype
from ..function import Function, op_error
from ._util import scatter_add


class Embedding(Function):
    """y = W[ids]  with W (V, D), ids (...) -> y (..., D);
    dL/dW[v] = sum of dL/dy over the positions where ids == v (scatter-add)"""

    @staticmethod
    def forward(ctx, weight, ids):
        if ids.dtype.kind not in "iu":
            raise op_error("embedding", f"ids must be integers, got {ids.dtype}", TypeError)
        V = weight.shape[0]
        # the range check reads ids on the host; a captured step checked its batch before
        if ids.size and not backend.is_capturing() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise op_error("embedding", f"ids must be in [0, {V}), got min {int(ids.min())} max {int(ids.max())}", IndexError)
        ctx.save(ids)
        ctx.shape = weight.shape
        return weight[ids]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved
        xp = backend.array_module(grad)
        acc = accumulation_dtype(grad.dtype)              # 16-bit rows are summed in float32
        dw = xp.zeros(ctx.shape, dtype=acc)
        dw = scatter_add(dw, ids.reshape(-1), grad.reshape(-1, ctx.shape[1]).astype(acc, copy=False))
        return dw.astype(grad.dtype, copy=False), None


class Dropout(Function):
    """y = x * m / (1 - p),  m ~ Bernoulli(1 - p) drawn from tinymoe's seeded RNG (on a GPU
    the counter-based one, tinymoe/kernels/random);
    dL/dx = dL/dy * m / (1 - p)"""

    @staticmethod
    def forward(ctx, x, p):
        if backend.is_cupy_array(x):       # the counter-based generator: one launch, capturable
            from ...kernels import random
            acc = accumulation_dtype(x.dtype)  # drawn in float32 for 16-bit x
            scale = random.dropout_scale(x.shape, acc, p).astype(x.dtype, copy=False)
        else:
            keep = backend.rng("cpu").random(x.shape, dtype=accumulation_dtype(x.dtype)) >= p
            scale = (keep * (1 / (1 - p))).astype(x.dtype)
        ctx.save(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved
        return grad * scale


class Conv1dCausal(Function):
    """Causal depthwise convolution (Mamba's conv1d): x (B, C, L), w (C, 1, K), b (C,)
        y[b, c, t] = b[c] + sum_k w[c, 0, k] x[b, c, t + k - (K - 1)]   (x = 0 before t = 0)
    so y_t sees x_{t-K+1..t} and never the future.
        dL/dx[b, c, s] = sum_k w[c, 0, k] g[b, c, s - k + K - 1]
        dL/dw[c, 0, k] = sum_{b, t} g[b, c, t] xpad[b, c, t + k]
        dL/db[c] = sum_{b, t} g[b, c, t]"""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if x.ndim != 3 or weight.ndim != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
            raise op_error("conv1d_causal", f"expected x (B, C, L) and weight (C, 1, K), got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (x.shape[1],):
            raise op_error("conv1d_causal", f"bias has shape {tuple(bias.shape)}, expected ({x.shape[1]},)")
        xp = backend.array_module(x)
        B, C, L = x.shape
        K = weight.shape[2]
        xpad = xp.pad(x, ((0, 0), (0, 0), (K - 1, 0)))  # (B, C, L + K - 1)
        w = weight[:, 0, :]  # (C, K)
        y = xp.zeros_like(x) if bias is None else xp.broadcast_to(bias[:, None], x.shape).astype(x.dtype, copy=True)
        for k in range(K):
            y += w[None, :, k, None] * xpad[:, :, k : k + L]
        ctx.save(xpad, w)
        return y

    @staticmethod
    def backward(ctx, grad):
        xpad, w = ctx.saved
        xp = backend.array_module(grad)
        gx, gw, gb = ctx.needs_input_grad
        K = w.shape[1]
        L = grad.shape[2]
        dx = dw = db = None
        if gx:
            dxpad = xp.zeros_like(xpad)
            for k in range(K):
                dxpad[:, :, k : k + L] += w[None, :, k, None] * grad
            dx = dxpad[:, :, K - 1 :]
        if gw:
            acc = accumulation_dtype(grad.dtype)          # float32 sums for 16-bit data
            dw = xp.stack([(grad * xpad[:, :, k : k + L]).sum(axis=(0, 2), dtype=acc)
                           for k in range(K)], axis=1)[:, None, :]
        if gb:
            db = grad.sum(axis=(0, 2), dtype=accumulation_dtype(grad.dtype))
        return dx, dw, db
