"""AdamW (Loshchilov & Hutter, 2019): Adam (Kingma & Ba, 2015) with decoupled weight decay.

For each parameter p with gradient g, at step t = 1, 2, ...:
    p = p - lr * weight_decay * p              # decoupled decay (not folded into g)
    m = beta1 * m + (1 - beta1) * g            # first moment (mean of g)
    v = beta2 * v + (1 - beta2) * g^2          # second moment (uncentred variance)
    m_hat = m / (1 - beta1^t)                  # bias corrections: m, v start at 0
    v_hat = v / (1 - beta2^t)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
(Same update as torch.optim.AdamW.) The NumPy lines in `step` are the math and run on
the CPU; on CuPy arrays the whole update of a parameter is one fused kernel
(tinymoe/kernels/elementwise.py) instead of a dozen CuPy kernels.
"""
from __future__ import annotations

import math

from .. import backend
from ..kernels import elementwise
from .optimizer import Optimizer


class AdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"AdamW: lr, eps and weight_decay must be >= 0, got "
                f"lr={lr}, eps={eps}, weight_decay={weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def step(self, found_inf=None):
        if self._skips(found_inf):
            return
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, xp = p.grad, backend.array_module(p.data)
                state = self.state.setdefault(id(p), {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = xp.zeros_like(p.data)     # m
                    state["exp_avg_sq"] = xp.zeros_like(p.data)  # v
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if backend.is_cupy_array(p.data):
                    elementwise.adamw_update(p.data, g, m, v, lr=lr, beta1=beta1, beta2=beta2,
                                             eps=eps, weight_decay=wd, step=t)
                    continue

                if wd != 0:
                    p.data *= 1 - lr * wd                        # p = p - lr * wd * p
                m *= beta1
                m += (1 - beta1) * g                             # m = b1 m + (1 - b1) g
                v *= beta2
                v += (1 - beta2) * (g * g)                       # v = b2 v + (1 - b2) g^2
                # p -= lr * m_hat / (sqrt(v_hat) + eps), with the corrections folded in:
                #   m_hat / (sqrt(v_hat) + eps) = (m / c1) / (sqrt(v) / sqrt(c2) + eps)
                c1, c2 = 1 - beta1**t, 1 - beta2**t
                denom = xp.sqrt(v)
                denom /= math.sqrt(c2)
                denom += eps
                p.data -= (lr / c1) * m / denom
