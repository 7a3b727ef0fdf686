"""Compute-optimal training (Hoffmann et al. 2022, "Chinchilla").

The lecture's calculations:
- train on about 20 tokens per parameter;
- a training run costs C = 6 N D FLOPs, i.e. C / (peak * utilization) seconds of GPU;
- the fitted loss L(N, D) = E + A / N^alpha + B / D^beta (Approach 3) says how far a
  run is from the optimum: GPT-3 (175B parameters, 300B tokens) reaches a loss that
  a 20-tokens-per-parameter model reaches with about 2.5x less compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .arithmetic import training_flops

TOKENS_PER_PARAM = 20.0
SECONDS_PER_YEAR = 365.25 * 24 * 3600


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; defaults: Chinchilla's Approach 3 fit."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n_params: float, n_tokens: float) -> float:
        _check_positive("LossFit.loss", n_params=n_params, n_tokens=n_tokens)
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta


CHINCHILLA = LossFit()


def _check_positive(op, **values):
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{op}: {name} must be positive, got {v!r}")


def optimal_tokens(n_params: float, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """D_opt ~= 20 N."""
    _check_positive("optimal_tokens", n_params=n_params)
    return tokens_per_param * n_params


def optimal_params_for_compute(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """N such that C = 6 N (20 N): N = sqrt(C / 120)."""
    _check_positive("optimal_params_for_compute", flops=flops)
    return math.sqrt(flops / (6.0 * tokens_per_param))


def gpu_seconds(flops: float, peak_flops: float, utilization: float) -> float:
    """Wall time on one GPU delivering `utilization` x `peak_flops` FLOP/s."""
    _check_positive("gpu_seconds", flops=flops, peak_flops=peak_flops, utilization=utilization)
    if utilization > 1:
        raise ValueError(f"gpu_seconds: utilization is a fraction in (0, 1], got {utilization}")
    return flops / (peak_flops * utilization)


def gpu_years(flops: float, peak_flops: float = 150e12, utilization: float = 0.25) -> float:
    """GPU-years of a training run: 4.56e22 FLOPs at 25% of 150 TFLOP/s = 38.5 years."""
    return gpu_seconds(flops, peak_flops, utilization) / SECONDS_PER_YEAR


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """Root of an increasing-or-decreasing f on [lo, hi] in log space."""
    flo = f(lo)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if (f(mid) > 0) == (flo > 0):
            lo, flo = mid, f(mid)
        else:
            hi = mid
    return math.sqrt(lo * hi)


def params_for_loss(target_loss: float, fit: LossFit = CHINCHILLA,
                    tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """The N whose 20-tokens-per-parameter run reaches `target_loss`."""
    if target_loss <= fit.E:
        raise ValueError(
            f"params_for_loss: target_loss={target_loss} is not above the irreducible loss E={fit.E}"
        )
    return _bisect(lambda n: fit.loss(n, tokens_per_param * n) - target_loss, 1e3, 1e18)


def waste_factor(n_params: float, n_tokens: float, fit: LossFit = CHINCHILLA,
                 tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Compute of a run / compute of the 20-tokens-per-parameter run with the same loss.

    GPT-3: L(175e9, 300e9) = 2.00; a 32B model on 640B tokens reaches it, so
    6 * 175e9 * 300e9 / (6 * 32e9 * 640e9) = 2.57.
    """
    loss = fit.loss(n_params, n_tokens)
    n_opt = params_for_loss(loss, fit, tokens_per_param)
    return training_flops(n_params, n_tokens) / training_flops(n_opt, tokens_per_param * n_opt)
