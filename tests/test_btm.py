"""Branch-Train-Merge: the domain-posterior ensemble and parameter averaging."""
import numpy as np
import pytest

from tinymoe import manual_seed
from tinymoe.models import build_model
from tinymoe.models.btm import average_parameters, domain_posterior, ensemble_log_probs
from tinymoe.nn import Linear, Module

TINY = dict(n_layer=1, d_model=8, n_head=2, d_ff=16, block_size=8)


def test_two_branches_three_tokens_by_hand():
    """p_1 = (1/2, 1/4, 1/2), p_2 = (1/4, 1/2, 1/4), uniform prior:
    t=0: post = (1/2, 1/2)                        p = 1/2 1/2 + 1/2 1/4 = 3/8
    t=1: post ~ (1/2, 1/4) = (2/3, 1/3)            p = 2/3 1/4 + 1/3 1/2 = 1/3
    t=2: post ~ (1/2 1/4, 1/4 1/2) = (1/2, 1/2)    p = 1/2 1/2 + 1/2 1/4 = 3/8"""
    lp = [np.log([1 / 2, 1 / 4, 1 / 2]), np.log([1 / 4, 1 / 2, 1 / 4])]
    np.testing.assert_allclose(np.exp(domain_posterior(lp)),
                               [[1 / 2, 2 / 3, 1 / 2], [1 / 2, 1 / 3, 1 / 2]], rtol=1e-12)
    np.testing.assert_allclose(np.exp(ensemble_log_probs(lp)), [3 / 8, 1 / 3, 3 / 8], rtol=1e-12)


def test_prior_weights_the_branches():
    """prior (3/4, 1/4): t=0: p = 3/4 1/2 + 1/4 1/4 = 7/16;
    t=1: post ~ (3/4 1/2, 1/4 1/4) = (6/7, 1/7), p = 6/7 1/4 + 1/7 1/2 = 2/7."""
    lp = [np.log([1 / 2, 1 / 4]), np.log([1 / 4, 1 / 2])]
    np.testing.assert_allclose(np.exp(ensemble_log_probs(lp, prior=[3, 1])), [7 / 16, 2 / 7],
                               rtol=1e-12)
    # a branch with prior 0 never contributes
    np.testing.assert_allclose(ensemble_log_probs(lp, prior=[0.0, 1.0]), lp[1], rtol=1e-12)


def test_the_sequence_probability_is_the_bayesian_mixture():
    """prod_t p(x_t | x_<t) = sum_k prior_k prod_t p_k(x_t | x_<t), per sequence."""
    rng = np.random.default_rng(0)
    lp = [np.log(rng.uniform(0.01, 1, size=(3, 7))) for _ in range(4)]        # K=4, (B=3, L=7)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    mixed = ensemble_log_probs(lp, prior)
    assert mixed.shape == (3, 7)
    want = np.log(sum(w * np.exp(l.sum(axis=-1)) for w, l in zip(prior, lp)))
    np.testing.assert_allclose(mixed.sum(axis=-1), want, rtol=1e-12)


def test_one_branch_is_that_branch():
    lp = np.log(np.random.default_rng(1).uniform(0.01, 1, size=(2, 5)))
    np.testing.assert_allclose(ensemble_log_probs([lp]), lp, rtol=1e-12)
    np.testing.assert_allclose(domain_posterior([lp]), np.zeros((1, 2, 5)), atol=1e-12)


def test_long_sequences_do_not_underflow():
    """1000 tokens of p = 1e-3 and 2e-3: the products are 1e-3000, far below float64,
    yet the posterior must tend to the better branch and the mixture to its log-prob."""
    L = 1000
    lp = [np.full(L, np.log(1e-3)), np.full(L, np.log(2e-3))]
    post, mixed = np.exp(domain_posterior(lp)), ensemble_log_probs(lp)
    assert np.isfinite(mixed).all()
    np.testing.assert_allclose(post[:, 0], [0.5, 0.5])
    np.testing.assert_allclose(post[1, -1], 1.0)
    np.testing.assert_allclose(mixed[-1], np.log(2e-3))


def test_ensemble_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"ensemble_log_probs: .*\[\(3,\), \(4,\)\]"):
        ensemble_log_probs([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="at least one branch"):
        ensemble_log_probs([])
    with pytest.raises(ValueError, match=r"prior must be 2 non-negative weights.*\(3,\)"):
        ensemble_log_probs([np.zeros(3), np.zeros(3)], prior=[1, 1, 1])
    with pytest.raises(ValueError, match="prior must be"):
        domain_posterior([np.zeros(3), np.zeros(3)], prior=[1, -1])


def test_average_of_two_tiny_models_is_the_elementwise_mean():
    manual_seed(0)
    a, b = build_model("gpt", **TINY), build_model("gpt", **TINY)
    before = {n: p.data.copy() for n, p in a.named_parameters()}
    merged = average_parameters([a, b])
    pb = dict(b.named_parameters())
    for name, p in merged.named_parameters():
        np.testing.assert_allclose(p.data, (before[name] + pb[name].data) / 2, rtol=1e-6)
        assert p.data.dtype == before[name].dtype
    for name, p in a.named_parameters():                                      # inputs unchanged
        np.testing.assert_array_equal(p.data, before[name])
    assert merged is not a and type(merged) is type(a)
    ids = np.arange(8)[None] % 256
    assert merged(ids)[0].shape == (1, 8, 256)


def test_average_of_one_model_is_a_copy():
    manual_seed(0)
    a = build_model("gpt", **TINY)
    merged = average_parameters([a])
    for (n, p), (_, q) in zip(a.named_parameters(), merged.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)
        assert p.data is not q.data


class Tiny(Module):
    def __init__(self, d_in, d_out, extra=False):
        super().__init__()
        self.fc = Linear(d_in, d_out)
        if extra:
            self.head = Linear(d_out, 1)


def test_average_errors_name_the_parameter_and_shapes():
    with pytest.raises(ValueError, match=r"'fc.weight' is \(3, 2\) in model 0 but \(4, 2\) in model 1"):
        average_parameters([Tiny(2, 3), Tiny(2, 4)])
    with pytest.raises(ValueError, match=r"model 1 has other parameters.*head.bias"):
        average_parameters([Tiny(2, 3), Tiny(2, 3, extra=True)])
    with pytest.raises(ValueError, match="at least one model"):
        average_parameters([])
