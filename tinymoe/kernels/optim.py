"""Optimizer kernels that never talk to the host (CUDA C in optim.cu, CuPy launches here).

    n = norm(g)                                             ||g|| of a flat buffer (float64)
    clip_by_norm_(g, n, max_norm)                           g *= min(1, max_norm / (n + eps))
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


def norm(g):
    """||g|| of a flat array as a 0-d float64 device array (sum of squares in float64, in a
    fixed order: the same bits every time). 2 launches."""
    cp = cupy()
    g = cp.ascontiguousarray(g).reshape(-1)
    partial = cp.empty(NORM_BLOCKS, cp.float64)
    _function("sumsq_partials", _ctype(g.dtype))((NORM_BLOCKS,), (NORM_THREADS,),
                                                  (g, np.int64(g.size), partial))
    out = cp.empty((), cp.float64)
    _function("sqrt_sum")((1,), (NORM_THREADS,), (partial, np.int32(NORM_BLOCKS), out))
    return out


@lru_cache(maxsize=None)
def _elementwise(name):
    cp = cupy()
    if name == "clip":
        # the factor min(1, c / (n + eps)) computed as scale_grads_ does, then g *= T(factor)
        return cp.ElementwiseKernel(
            "raw N norm, float64 max_norm, float64 eps", "T g",
            "g = g * T(min(max_norm / (double(norm[0]) + eps), 1.0))", "tinymoe_clip_by_norm")
    return cp.ElementwiseKernel(
        "T g, raw float64 coef, raw bool found_inf, T beta1, T one_minus_beta1, T beta2, "
        "T one_minus_beta2, T eps", "T p, T m, T v",
        "if (!found_inf[0]) tinymoe_adamw(p, m, v, g, T(coef[0]), beta1, one_minus_beta1, "
        "beta2, one_minus_beta2, T(coef[1]), T(coef[2]), eps)",
        "tinymoe_adamw_flat", preamble=ELEMENTWISE_SOURCE.read_text())


def clip_by_norm_(g, norm, max_norm: float, eps: float = 1e-6):
    """g *= min(1, max_norm / (norm + eps)) in place, norm a 0-d device array. 1 launch."""
    _elementwise("clip")(norm.reshape(1), np.float64(max_norm), np.float64(eps), g)
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
