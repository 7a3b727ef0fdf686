"""Routers: float64 gradchecks (noise fixed by seed), selection semantics, errors."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn.moe import ROUTERS, make_router

D, E, T = 4, 3, 6


def router64(name, top_k=2, **kw):
    r = make_router(name, D, E, top_k=min(top_k, E), z_loss_weight=1e-2, **kw)
    return r.to(dtype=np.float64)


def routing_output(router, capacity=None):
    def f(x, w):
        tm.manual_seed(1)                          # the same noise / random drops every call
        out = router(x, capacity)
        total = (out.weights * out.weights).sum()
        return total if out.aux_loss is None else total + out.aux_loss
    return f


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_gradcheck(name):
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((T, D)), requires_grad=True)
    router = router64(name)
    inputs = [x, router.gate.weight]
    tm.gradcheck(routing_output(router, capacity=2), inputs)
    if name == "noisy-topk":
        router.noise.weight.data[...] = rng.standard_normal(router.noise.weight.shape) * 0.3
        tm.gradcheck(lambda x, w, wn: routing_output(router)(x, w), inputs + [router.noise.weight])


def test_topk_selects_largest_and_renormalizes():
    r = router64("topk", top_k=2)
    x = tm.tensor(np.random.default_rng(1).standard_normal((T, D)))
    out = r(x)
    p = out.probs.numpy()
    np.testing.assert_array_equal(np.sort(out.expert_index, 1), np.sort(np.argsort(-p, 1)[:, :2], 1))
    np.testing.assert_allclose(out.weights.numpy().sum(1), 1.0)
    s = router64("switch")(x)
    assert s.expert_index.shape == (T, 1)
    np.testing.assert_allclose(s.weights.numpy()[:, 0], s.probs.numpy().max(1))  # p, not 1


def test_gshard_drops_second_choice_with_probability_2g2():
    r = make_router("gshard", 8, 4)
    x = tm.randn(4000, 8) * 3
    out = r(x)
    g2 = out.weights.numpy()[:, 1]
    kept = out.expert_index[:, 1] >= 0
    assert abs(kept.mean() - np.minimum(2 * g2, 1).mean()) < 0.03     # keep w.p. 2 g2
    assert (r.eval()(x).expert_index >= 0).all()                       # eval keeps both


def test_expert_choice_each_expert_takes_capacity_tokens():
    r = router64("expert-choice", top_k=1)
    out = r(tm.randn(T, D).double(), 3)
    chosen = out.expert_index >= 0
    np.testing.assert_array_equal(chosen.sum(0), [3, 3, 3])
    for e in range(E):                                                  # the top-3 tokens by score
        top = set(np.argsort(-out.probs.numpy()[:, e], kind="stable")[:3])
        assert set(np.flatnonzero(chosen[:, e])) == top


def test_base_router_is_balanced_in_training_and_greedy_in_eval():
    r = make_router("base", D, 2)
    r.gate.weight.data[...] = [[1, 0, 0, 0], [0.5, 0, 0, 0]]          # everyone prefers expert 0
    x = tm.tensor(np.abs(np.random.default_rng(0).standard_normal((8, D))).astype(np.float32))
    np.testing.assert_array_equal(np.bincount(r(x).expert_index[:, 0], minlength=2), [4, 4])
    np.testing.assert_array_equal(r.eval()(x).expert_index[:, 0], 0)


def test_noisy_topk_is_deterministic_in_eval_and_random_in_training():
    r = make_router("noisy-topk", D, E, top_k=1)
    x = tm.randn(50, D)
    a, b = r(x).expert_index, r(x).expert_index
    assert (a != b).any()                                              # noise differs between calls
    r.eval()
    np.testing.assert_array_equal(r(x).expert_index, r(x).expert_index)


def test_router_errors():
    with pytest.raises(ValueError, match="unknown router 'nope'; valid routers: dense, topk, switch"):
        make_router("nope", D, E)
    with pytest.raises(ValueError, match=r"router 'topk': top_k=5 must be between 1 and num_experts=3"):
        make_router("topk", D, E, top_k=5)
    with pytest.raises(ValueError, match="router 'gshard': needs num_experts >= 2"):
        make_router("gshard", D, 1)
