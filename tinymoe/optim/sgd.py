"""SGD with momentum (Polyak heavy ball, optional Nesterov) and L2 weight decay.

    g = grad + weight_decay * p             # L2 penalty folded into the gradient
    v = momentum * v + g                    # velocity (v = 0 before the first step)
    p = p - lr * (g + momentum * v)         # nesterov=True: look ahead along v
    p = p - lr * v                          # nesterov=False
With momentum = 0 this is plain gradient descent p = p - lr * g.
(Same update as torch.optim.SGD with dampening=0.)
"""
from __future__ import annotations

from .. import backend
from .optimizer import Optimizer


class SGD(Optimizer):
    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"SGD: lr, momentum and weight_decay must be >= 0, got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self, found_inf=None):
        if self._skips(found_inf):
            return
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0:
                    g = g + wd * p.data                       # g = grad + wd * p
                if mu != 0:
                    state = self.state.setdefault(id(p), {})
                    if "velocity" not in state:
                        state["velocity"] = backend.array_module(p.data).zeros_like(p.data)
                    v = state["velocity"]
                    v *= mu
                    v += g                                    # v = mu * v + g
                    g = g + mu * v if group["nesterov"] else v
                p.data -= lr * g                              # p = p - lr * g
