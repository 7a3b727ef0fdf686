"""AdamW (Loshchilov & Hutter, 2019): Adam (Kingma & Ba, 2015) with decoupled weight decay.

For each parameter p with gradient g, at step t = 1, 2, ...:
    p = p - lr * weight_decay * p              # decoupled decay (not folded into g)
    m = beta1 * m + (1 - beta1) * g            # first moment (mean of g)
    v = beta2 * v + (1 - beta2) * g^2          # second moment (uncentred variance)
    m_hat = m / (1 - beta1^t)                  # bias corrections: m, v start at 0
    v_hat = v / (1 - beta2^t)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
(Same update as torch.optim.AdamW.) `_update` is the math, in NumPy (or CuPy) array code.

Two ways to run it:
- per tensor (fused=False): the loop below, one parameter at a time; on CuPy arrays each
  parameter's update is one kernel (tinymoe/kernels/elementwise.py).
- fused (fused=True, the default on a GPU): every parameter lives in one flat buffer
  (optim/flat.py) and a group's update is one launch over its range, after one launch that
  computes the step's scalars on the device (kernels/optim.py). The learning rate, the step
  count t and the found_inf flag are device arrays, so the host never reads a number and a
  captured CUDA graph replays the whole step; the schedule's lr is copied to the device by
  `load_lr()` (by step() itself, except while a graph is being captured). One step count
  serves every parameter (a parameter without a gradient at some step is left alone, but
  its next bias correction uses the common t). On NumPy arrays the fused path runs the same
  `_update` on the flat ranges: the same numbers as per tensor, bit for bit.

step(found_inf=...): where the flag (a 0-d bool array, e.g. not the step's finite flag) is true, no
parameter, moment or step count changes (a step skipped for an inf or nan gradient).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernels import elementwise
from .flat import FlatParams
from .optimizer import Optimizer


def _update(xp, p, g, m, v, decay, beta1, beta2, step_size, sqrt_c2, eps):
    """One AdamW step in place, in the order the kernels compute it; the scalars are
    Python floats: decay = 1 - lr wd, step_size = lr / c1, sqrt_c2 = sqrt(1 - beta2^t)."""
    p *= decay                                           # p = p - lr * wd * p
    m *= beta1
    m += (1 - beta1) * g                                 # m = b1 m + (1 - b1) g
    v *= beta2
    v += (1 - beta2) * (g * g)                           # v = b2 v + (1 - b2) g^2
    # p -= lr * m_hat / (sqrt(v_hat) + eps), with the corrections folded in:
    #   m_hat / (sqrt(v_hat) + eps) = (m / c1) / (sqrt(v) / sqrt(c2) + eps)
    denom = xp.sqrt(v)
    denom /= sqrt_c2
    denom += eps
    p -= step_size * m / denom


def _scalars(lr, weight_decay, beta1, beta2, t):
    """(decay, step_size, sqrt_c2) of step t, as kernels/optim.cu :: adamw_prepare."""
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    return 1 - lr * weight_decay, lr / c1, math.sqrt(c2)


class AdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"AdamW: lr, eps and weight_decay must be >= 0, got "
                f"lr={lr}, eps={eps}, weight_decay={weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.fused = fused          # None: fused on a GPU, per tensor on the CPU
        self._flat = None           # the fused state (_FusedState), made on the first step

    def step(self, found_inf=None):
        if self._use_fused():
            return self._fused_step(found_inf)
        if self._skips(found_inf):                                      # (a sync on a GPU)
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
                decay, step_size, sqrt_c2 = _scalars(lr, wd, beta1, beta2, t)
                _update(xp, p.data, g, m, v, decay, beta1, beta2, step_size, sqrt_c2, eps)

    # ------------------------------------------------------------------ fused
    def _use_fused(self) -> bool:
        if self.fused is not None:
            return self.fused
        return backend.is_cupy_array(self.param_groups[0]["params"][0].data)

    def _fused_state(self):
        if self._flat is None:
            self._flat = _FusedState(self)
        elif not self._flat.flat.attached():
            self._flat.flat.attach()
        return self._flat

    def load_lr(self):
        """Copy every group's lr (and settings) to the device buffer the fused step reads:
        one small host-to-device copy, the only input a replayed step takes from the host
        besides the batch."""
        self._fused_state().load_hyper()

    def _fused_step(self, found_inf):
        state = self._fused_state()
        if not backend.is_capturing():
            state.load_hyper()
        state.step(found_inf)

    def state_dict(self):
        if self._flat is not None:
            self._flat.write_back()
        return super().state_dict()

    def load_state_dict(self, arrays, meta):
        super().load_state_dict(arrays, meta)
        self._flat = None           # rebuilt from the loaded state on the next step


class _FusedState:
    """The fused AdamW's buffers: parameters, gradients, m and v flat (one dtype), the step
    count t, the per-group hyperparameters (lr, wd, beta1, beta2) and scalars of the step."""

    def __init__(self, opt: AdamW):
        self.opt = opt
        groups = [g["params"] for g in opt.param_groups]
        self.flat = flat = FlatParams(groups)
        xp = backend.array_module(flat.data)
        self.xp = xp
        self.m, self.v = xp.zeros_like(flat.data), xp.zeros_like(flat.data)
        steps = set()
        for p, s in zip(flat.params, flat.slices):                 # continue a loaded state
            state = opt.state.get(id(p))
            if state:
                self.m[s] = state["exp_avg"].reshape(-1)
                self.v[s] = state["exp_avg_sq"].reshape(-1)
                steps.add(int(state["step"]))
        if len(steps) > 1:
            raise ValueError(f"AdamW(fused=True): the parameters' step counts differ ({sorted(steps)}); "
                             "the fused step keeps one for all: use fused=False")
        self.t = xp.full((), steps.pop() if steps else 0, dtype=xp.int64)   # step count
        self.hyper = xp.zeros((len(groups), 4), xp.float64)        # (G, 4) lr, wd, beta1, beta2
        self.coef = xp.zeros((len(groups), 3), xp.float64)         # (G, 3) decay, lr/c1, sqrt(c2)
        self.no_inf = xp.zeros((), dtype=bool)
        for p, s in zip(flat.params, flat.slices):                 # state_dict reads these views
            opt.state[id(p)] = {"step": 0, "exp_avg": self.m[s].reshape(p.shape),
                                "exp_avg_sq": self.v[s].reshape(p.shape)}
        self.load_hyper()

    def load_hyper(self):
        host = np.array([[g["lr"], g["weight_decay"], *g["betas"]] for g in self.opt.param_groups],
                        dtype=np.float64)
        if self.xp is np:
            self.hyper[...] = host
        else:
            self.hyper.set(host)

    def write_back(self):
        """The step count into every parameter's state (a device read), for state_dict."""
        t = int(self.t)
        for p in self.flat.params:
            self.opt.state[id(p)]["step"] = t

    def step(self, found_inf):
        flat = self.flat
        present = flat.gradients_present()
        found_inf = self.no_inf if found_inf is None else found_inf
        if self.xp is np:
            self._prepare_numpy(found_inf)
        else:
            from ..kernels import optim as kernels
            kernels.adamw_prepare(self.hyper, found_inf, self.t, self.coef)
        for gi, (group, (a, b)) in enumerate(zip(self.opt.param_groups, flat.ranges)):
            beta1, beta2 = group["betas"]
            for lo, hi in _runs(present, flat.slices, a, b):      # usually one run: [a, b)
                if self.xp is np:
                    if not found_inf:
                        decay, step_size, sqrt_c2 = (float(c) for c in self.coef[gi])
                        _update(np, flat.data[lo:hi], flat.grad[lo:hi], self.m[lo:hi], self.v[lo:hi],
                                decay, beta1, beta2, step_size, sqrt_c2, group["eps"])
                else:
                    kernels.adamw_flat_(flat.data[lo:hi], flat.grad[lo:hi], self.m[lo:hi],
                                        self.v[lo:hi], self.coef[gi], found_inf, beta1, beta2,
                                        group["eps"])

    def _prepare_numpy(self, found_inf):
        """kernels/optim.cu :: adamw_prepare, in NumPy."""
        if found_inf:
            return
        self.t += 1
        for g, (lr, wd, beta1, beta2) in enumerate(self.hyper):
            self.coef[g] = _scalars(float(lr), float(wd), float(beta1), float(beta2), int(self.t))


def _runs(present, slices, a, b):
    """Maximal ranges [lo, hi) inside [a, b) of consecutive parameters that have gradients."""
    runs, lo = [], None
    for has, s in zip(present, slices):
        if s.start < a or s.stop > b:
            continue
        if has and lo is None:
            lo = s.start
        if not has and lo is not None:
            runs.append((lo, s.start))
            lo = None
        hi = s.stop
    if lo is not None:
        runs.append((lo, hi))
    return runs
