"""Optimizer kernels that never talk to the host (CUDA C in optim.cu, CuPy launches here).

    norm, scale, found_inf = clip_scale(grads, max_norm)    ||g|| over every array of `grads`
    scale_(g, scale)                                        g *= scale, in place
    adamw_prepare(hyper, found_inf, step, coef)             AdamW's scalars for step t = step + 1
    adamw_flat_(p, g, m, v, coef, found_inf, beta1, beta2, eps)   one AdamW step of a flat range

Every scalar a step needs (the norm, the clip factor, whether a gradient is inf or nan, the
step count t, the learning rate) is a device array: the kernels read it there, so a captured
CUDA graph replays a whole optimizer step, and the host never waits for the GPU. The NumPy
spec of each is in tinymoe/optim/fused.py (the same arithmetic on NumPy arrays, the CPU path).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..backend import cupy
from .elementwise import SOURCE as ELEMENTWISE_SOURCE

SOURCE = Path(__file__).with_name("optim.cu")
NORM_THREADS = 256
NORM_BLOCKS = 264          # partial sums per array: enough blocks to fill an H200's 132 SMs twice


def _ctype(dtype) -> str:
    return {np.float32: "float", np.float64: "double"}[np.dtype(dtype).type]


@lru_cache(maxsize=None)
def _module(ctypes: tuple):
    names = [f"sumsq_partials<{c}>" for c in ctypes]
    return cupy().RawModule(code=SOURCE.read_text(), options=(f"-DNORM_THREADS={NORM_THREADS}",),
                            name_expressions=names)


def _function(name, ctype="float"):
    module = _module(("float", "double"))
    return module.get_function(f"{name}<{ctype}>" if name == "sumsq_partials" else name)


def clip_scale(grads, max_norm=None, eps: float = 1e-6):
    """-> (norm, scale, found_inf), 0-d device arrays: norm = sqrt(sum over the arrays of sum
    g^2) (in float64), scale = min(1, max_norm / (norm + eps)) (1 when max_norm is None),
    found_inf = the norm is not finite. 2 launches for one flat buffer, n + 1 for n arrays."""
    cp = cupy()
    grads = [g for g in grads if g.size]
    partial = cp.zeros(max(len(grads), 1) * NORM_BLOCKS, cp.float64)
    for i, g in enumerate(grads):
        g = cp.ascontiguousarray(g).reshape(-1)
        _function("sumsq_partials", _ctype(g.dtype))(
            (NORM_BLOCKS,), (NORM_THREADS,), (g, np.int64(g.size), partial[i * NORM_BLOCKS:]))
    norm, scale = cp.empty((), cp.float64), cp.empty((), cp.float64)
    found_inf = cp.empty((), cp.bool_)
    limit = np.inf if max_norm is None else float(max_norm)
    _function("clip_finish")((1,), (NORM_THREADS,), (partial, np.int32(partial.size), np.float64(limit),
                                                      np.float64(eps), norm, scale, found_inf))
    return norm, scale, found_inf


@lru_cache(maxsize=None)
def _elementwise(name):
    cp = cupy()
    if name == "scale":
        return cp.ElementwiseKernel("raw float64 scale", "T g", "g = g * T(scale[0])",
                                    "tinymoe_scale_by")
    return cp.ElementwiseKernel(
        "T g, raw float64 coef, raw bool found_inf, T beta1, T one_minus_beta1, T beta2, "
        "T one_minus_beta2, T eps", "T p, T m, T v",
        "if (!found_inf[0]) tinymoe_adamw(p, m, v, g, T(coef[0]), beta1, one_minus_beta1, "
        "beta2, one_minus_beta2, T(coef[1]), T(coef[2]), eps)",
        "tinymoe_adamw_flat", preamble=ELEMENTWISE_SOURCE.read_text())


def scale_(g, scale):
    """g *= scale (a 0-d float64 device array, rounded to g's dtype first), in place."""
    _elementwise("scale")(scale.reshape(1), g)
    return g


def adamw_prepare(hyper, found_inf, step, coef):
    """One thread: unless found_inf, step += 1 and coef[g] = (1 - lr wd, lr / c1, sqrt(c2))
    for every group g of hyper (G, 4) = (lr, weight_decay, beta1, beta2)."""
    _function("adamw_prepare")((1,), (1,), (hyper, np.int32(hyper.shape[0]), found_inf, step, coef))


def adamw_flat_(p, g, m, v, coef, found_inf, beta1, beta2, eps):
    """One AdamW step of elementwise/tinymoe_adamw on flat p, m, v in place (coef: this
    group's row of adamw_prepare); nothing changes where found_inf is true."""
    t = p.dtype.type
    _elementwise("adamw")(g, coef, found_inf, t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
                          t(eps), p, m, v)
