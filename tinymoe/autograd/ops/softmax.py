"""Softmax, log-softmax and the fused, stable cross-entropy.

Half-precision inputs (float16, bfloat16) are computed in float32: exp, the row sums and
the log of a softmax lose digits that 8 mantissa bits cannot spare. Softmax and log-softmax
return the input's dtype; the cross-entropy returns float32 (a loss is a reduction)."""
from ... import backend
from ...dtypes import upcast
from ..function import Function, op_error


def _log_softmax(xp, x, axis):
    # log softmax(x)_i = x_i - m - log sum_j e^(x_j - m),  m = max_j x_j (no overflow)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    """p_i = e^{x_i} / sum_j e^{x_j};  dL/dx_i = p_i (g_i - sum_j g_j p_j)"""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp, dtype = backend.array_module(x), x.dtype
        x, = upcast(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        p = (e / e.sum(axis=axis, keepdims=True)).astype(dtype, copy=False)
        ctx.axis = axis
        ctx.save(p)
        return p

    @staticmethod
    def backward(ctx, grad):
        p, grad = upcast(*ctx.saved, grad)
        dx = grad - (grad * p).sum(axis=ctx.axis, keepdims=True)   # one full-size temporary
        dx *= p                                                     # in place: none more
        return dx


class LogSoftmax(Function):
    """y_i = x_i - logsumexp(x);  dL/dx_i = g_i - softmax(x)_i sum_j g_j"""

    @staticmethod
    def forward(ctx, x, axis=-1):
        y = _log_softmax(backend.array_module(x), *upcast(x), axis).astype(x.dtype, copy=False)
        ctx.axis = axis
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, grad = upcast(*ctx.saved, grad)
        xp = backend.array_module(y)
        return grad - xp.exp(y) * grad.sum(axis=ctx.axis, keepdims=True)


class CrossEntropy(Function):
    """loss_n = -log softmax(z_n)[t_n] = logsumexp(z_n) - z_n[t_n]  for logits z (N, C);
    dloss_n/dz_n = softmax(z_n) - onehot(t_n).

    Rows whose target is `ignore_index` count for nothing; "mean" divides by the
    number of counted rows, "sum" does not, "none" returns one loss per row."""

    float_inputs = (0,)

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        xp = backend.array_module(logits)
        C = logits.shape[-1]
        z = logits.reshape(-1, C)  # (N, C)
        t = targets.reshape(-1)  # (N,)
        valid = t != ignore_index
        t_safe = xp.where(valid, t, 0)
        # The range check reads the targets on the host (a sync on a GPU): skipped while a
        # CUDA graph is captured, whose step checked its batch on the host before copying it.
        if t.size and not backend.is_capturing():
            lo, hi = (int(v) for v in xp.stack([t_safe.min(), t_safe.max()]).tolist())
            if lo < 0 or hi >= C:
                raise op_error("cross_entropy", f"targets must be in [0, {C}) or ignore_index, "
                               f"got min {lo} max {hi}")
        logp = _log_softmax(xp, *upcast(z), -1)  # (N, C), float32 for 16-bit logits
        losses = -xp.take_along_axis(logp, t_safe[:, None], axis=1)[:, 0] * valid
        # the number of counted rows stays an array: no host read
        count = xp.maximum(valid.sum(), 1).astype(logp.dtype) if reduction == "mean" else 1
        ctx.save(logp, t_safe, valid)
        ctx.shape, ctx.reduction, ctx.count = logits.shape, reduction, count
        if reduction == "none":
            return losses.reshape(targets.shape)
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        logp, t, valid = ctx.saved
        xp = backend.array_module(logp)
        dz = xp.exp(logp)  # softmax
        dz[xp.arange(len(t)), t] -= 1
        if ctx.reduction == "none":
            dz *= (grad.reshape(-1) * valid)[:, None]
        else:
            dz *= (valid * (grad / ctx.count))[:, None]
        return dz.reshape(ctx.shape), None
