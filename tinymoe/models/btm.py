"""Branch-Train-Merge (Li et al. 2022): merge K expert LMs trained apart, one per domain.

Two ways to merge the branches:

- Ensemble by domain posterior (the paper's sec. 4.1). The next-token distribution is a
  mixture of the branches, weighted by how well each branch explained the text so far:

      p(x_t | x_<t) = sum_k post_k(t) p_k(x_t | x_<t)
      post_k(t) = prior_k prod_{s<t} p_k(x_s | x_<s) / sum_j prior_j prod_{s<t} p_j(x_s | x_<s)

  At t = 0 the posterior is the prior; over a sequence the ensemble's probabilities
  multiply to the Bayesian mixture sum_k prior_k prod_t p_k(x_t | x_<t).
  Everything is computed in log space (products become cumulative sums, normalizations
  logsumexps), so hundreds of tokens of probability 1e-3 do not underflow.

- Parameter averaging: one model whose every weight is the mean of the branches'
  (the branches start from one seed model, so their weights stay comparable).

Both take plain arrays / Modules and work on NumPy or CuPy alike.
"""
from __future__ import annotations

import copy

from .. import backend


def _logsumexp(a, axis):
    """log sum exp(a) over `axis`, stable: the max is taken out first (all -inf stays -inf)."""
    xp = backend.array_module(a)
    m = a.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return (xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


def _stack_branches(log_probs, op):
    """K arrays of per-token log-probabilities, each (..., L) -> one (K, ..., L) array."""
    if len(log_probs) == 0:
        raise ValueError(f"{op}: needs the log-probabilities of at least one branch")
    shapes = [tuple(lp.shape) for lp in log_probs]
    if len(set(shapes)) != 1 or len(shapes[0]) == 0:
        raise ValueError(f"{op}: every branch needs log-probabilities of one shape (..., L); "
                         f"got {shapes}")
    xp = backend.array_module(log_probs[0])
    return xp.stack([xp.asarray(lp, dtype=float) for lp in log_probs])     # (K, ..., L)


def domain_posterior(log_probs, prior=None):
    """log post_k(t), the belief that the text comes from branch k's domain after x_<t.

    log_probs: K arrays (..., L), log p_k(x_t | x_<t) per token (time is the last axis);
    prior: K non-negative weights (uniform if None). Returns (K, ..., L).

        log post_k(t) = log prior_k + sum_{s<t} log p_k(x_s) - logsumexp_j(same for j)
    """
    lp = _stack_branches(log_probs, "domain_posterior")                    # (K, ..., L)
    xp = backend.array_module(lp)
    K = lp.shape[0]
    if prior is None:
        prior = xp.full(K, 1.0 / K)
    prior = xp.asarray(prior, dtype=float)
    if prior.shape != (K,) or bool((prior < 0).any()) or not float(prior.sum()) > 0:
        raise ValueError(f"domain_posterior: prior must be {K} non-negative weights, not all "
                         f"zero, one per branch; got shape {prior.shape}")
    prior = prior / prior.sum()
    log_prior = xp.where(prior > 0, xp.log(xp.where(prior > 0, prior, 1.0)), -xp.inf)  # log 0 = -inf
    log_prior = log_prior.reshape((K,) + (1,) * (lp.ndim - 1))
    prefix = xp.cumsum(lp, axis=-1) - lp                                   # sum_{s<t} log p_k(x_s)
    joint = log_prior + prefix                                             # log prior_k prod_{s<t} p_k
    return joint - _logsumexp(joint, axis=0)[None]


def ensemble_log_probs(log_probs, prior=None):
    """log p(x_t | x_<t) of the BTM ensemble: log sum_k post_k(t) p_k(x_t | x_<t).

    log_probs: K arrays (..., L) of per-token log-probabilities, one per branch;
    prior: K weights (uniform if None). Returns (..., L). With one branch it is that branch.
    """
    lp = _stack_branches(log_probs, "ensemble_log_probs")                  # (K, ..., L)
    return _logsumexp(domain_posterior(log_probs, prior) + lp, axis=0)


def average_parameters(models):
    """A new model (a copy of models[0]) whose parameters are the elementwise mean of the
    models' parameters: theta = (1/K) sum_k theta_k. Buffers are models[0]'s. The models
    must have the same parameter names and shapes (branches of one seed model)."""
    if len(models) == 0:
        raise ValueError("average_parameters: needs at least one model")
    params = [dict(m.named_parameters()) for m in models]
    names = list(params[0])
    for k, p in enumerate(params[1:], 1):
        if list(p) != names:
            differ = sorted(set(p).symmetric_difference(names)) or "(the same names, another order)"
            raise ValueError(f"average_parameters: model {k} has other parameters than model 0: "
                             f"{differ}")
        for name in names:
            if p[name].shape != params[0][name].shape:
                raise ValueError(f"average_parameters: parameter {name!r} is "
                                 f"{params[0][name].shape} in model 0 but {p[name].shape} "
                                 f"in model {k}")
    merged = copy.deepcopy(models[0])
    for name, param in merged.named_parameters():
        param.data[...] = sum(p[name].data for p in params) / len(params)
    return merged
