"""The MoE layer: gradchecks (dispatch Functions, grouped experts, whole layer per router),
capacity and dropping, the einsum form tested equal, statistics, errors."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.kernels.dispatch import make_dispatch_plan
from tinymoe.nn.moe import ROUTERS, MoELayer, combine, grouped_linear, moe_einsum, permute
from tinymoe.nn.moe import experts as experts_module

D, F_, E = 4, 3, 3


def layer64(router="topk", top_k=2, **kw):
    tm.manual_seed(0)
    return MoELayer(D, F_, E, top_k=min(top_k, E), router=router, z_loss_weight=1e-2, **kw).to(dtype=np.float64)


def test_permute_combine_gradcheck():
    rng = np.random.default_rng(0)
    index = np.array([[0, 2], [2, -1], [0, 1], [0, 2], [1, 0]])     # expert 0 over capacity 2
    plan = make_dispatch_plan(index, 3, capacity=2)
    x = tm.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    tm.gradcheck(lambda x: permute(x, plan), [x])
    ys = tm.tensor(rng.standard_normal((plan.num_rows, 4)), requires_grad=True)
    w = tm.tensor(rng.standard_normal((5, 2)), requires_grad=True)
    tm.gradcheck(lambda ys, w: combine(ys, w, plan), [ys, w])


@pytest.mark.parametrize("padding", [0.0, 10.0])     # 0: loop over experts; 10: one batched matmul
def test_grouped_linear_gradcheck_and_values_with_an_empty_expert(padding, monkeypatch):
    monkeypatch.setattr(experts_module, "BATCHED_MAX_PADDING", padding)
    monkeypatch.setattr(experts_module, "BATCHED_ON_CPU", True)
    rng = np.random.default_rng(1)
    offsets = np.array([0, 3, 3, 5])                                 # expert 1 has no rows
    xs = tm.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    W = tm.tensor(rng.standard_normal((3, 4, 2)), requires_grad=True)
    out = grouped_linear(xs, W, offsets).numpy()
    np.testing.assert_allclose(out[:3], xs.data[:3] @ W.data[0])
    np.testing.assert_allclose(out[3:], xs.data[3:] @ W.data[2])
    tm.gradcheck(lambda xs, W: grouped_linear(xs, W, offsets), [xs, W])
    with pytest.raises(ValueError, match=r"grouped_linear: rows have 4 features, weights \(3, 5, 2\) expect 5"):
        grouped_linear(xs, tm.zeros(3, 5, 2), offsets)


def test_grouped_linear_batched_equals_loop(monkeypatch):
    """Padded batched matmul and the per-expert loop agree, values and gradients, on odd
    group sizes (empty first and last experts, one row, unequal groups); bounds as a tuple."""
    rng = np.random.default_rng(3)
    bounds = (0, 0, 1, 8, 8, 13, 13)                                 # 6 experts, R = 13
    xs0, W0, g = rng.standard_normal((13, 5)), rng.standard_normal((6, 5, 7)), rng.standard_normal((13, 7))
    monkeypatch.setattr(experts_module, "BATCHED_ON_CPU", True)
    results = []
    for padding in (0.0, 10.0):
        monkeypatch.setattr(experts_module, "BATCHED_MAX_PADDING", padding)
        xs, W = tm.tensor(xs0, requires_grad=True), tm.tensor(W0, requires_grad=True)
        out = grouped_linear(xs, W, bounds)
        out.backward(g)
        results.append((out.numpy(), xs.grad, W.grad))
    for loop, batched in zip(*results):
        np.testing.assert_allclose(batched, loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(results[0][2][[0, 3, 5]], 0)      # empty experts: zero grad
    with pytest.raises(ValueError, match=r"grouped_linear: bounds \(0, 2, 13\) must be 7 offsets"):
        grouped_linear(tm.tensor(xs0), tm.tensor(W0), (0, 2, 13))


@pytest.mark.parametrize("router", list(ROUTERS))
def test_layer_gradcheck(router):
    layer = layer64(router, capacity_factor=1.0, num_shared_experts=1 if router == "topk" else 0)
    x = tm.tensor(np.random.default_rng(2).standard_normal((2, 3, D)), requires_grad=True)

    def f(x, *params):
        tm.manual_seed(3)                                   # fixed noise / random second choice
        y = layer(x)
        return (y * y).sum() + (layer.aux_loss if layer.aux_loss is not None else 0.0)

    params = [layer.gate.gate.weight, layer.experts.w1, layer.experts.w2]
    if layer.shared_experts is not None:
        params.append(layer.shared_experts.w1)
    tm.gradcheck(f, [x] + params)


def test_layer_swiglu_gradcheck():
    layer = layer64("switch", activation="swiglu", capacity_factor=None)
    x = tm.tensor(np.random.default_rng(4).standard_normal((5, D)), requires_grad=True)
    tm.gradcheck(lambda x, w3: layer(x).sum(), [x, layer.experts.w3])


def test_layer_matches_loop_over_tokens():
    """y_t = sum_j g_j f_{e_j}(x_t), computed token by token, dropless."""
    layer = layer64("topk", capacity_factor=None)
    x = tm.tensor(np.random.default_rng(5).standard_normal((7, D)))
    y = layer(x).numpy()
    routing = layer.gate(x)
    w1, w2 = layer.experts.w1.data, layer.experts.w2.data
    gelu = lambda h: tm.nn.F.gelu(tm.tensor(h)).numpy()
    for t in range(7):
        expect = sum(routing.weights.data[t, j] * gelu(x.data[t] @ w1[e]) @ w2[e]
                     for j, e in enumerate(routing.expert_index[t]))
        np.testing.assert_allclose(y[t], expect, atol=1e-12)


def test_capacity_drops_overflow_to_zero_output():
    tm.manual_seed(0)
    layer = MoELayer(D, F_, 4, top_k=1, router="switch", capacity_factor=1.0)
    layer.gate.gate.weight.data[...] = 0
    layer.gate.gate.weight.data[0] = 10.0                             # everyone picks expert 0
    x = tm.tensor(np.abs(np.random.default_rng(6).standard_normal((8, D))).astype(np.float32))
    y = layer(x).numpy()
    assert layer.capacity(8) == 2                                     # ceil(1.0 * 8 * 1 / 4)
    assert layer.last_stats["tokens_per_expert"] == [2, 0, 0, 0]
    assert layer.last_stats["dropped_fraction"] == pytest.approx(6 / 8)
    assert np.abs(y[:2]).sum() > 0 and np.all(y[2:] == 0)             # first two in token order kept
    layer.capacity_factor = None                                      # dropless
    layer(x)
    assert layer.last_stats["tokens_per_expert"] == [8, 0, 0, 0]
    layer.eval()                                                      # eval factor 2.0 -> C = 4
    layer(x)
    assert layer.last_stats["tokens_per_expert"] == [4, 0, 0, 0]


def test_statistics_are_computed_on_first_read_as_plain_numbers():
    layer = layer64("topk", aux_loss_weight=0.5)                      # z_loss_weight 1e-2
    layer(tm.tensor(np.random.default_rng(8).standard_normal((6, D))))
    assert callable(layer._stats)                                     # nothing fetched yet
    st = layer.last_stats
    assert st is layer.last_stats and not callable(layer._stats)
    assert sum(st["tokens_per_expert"]) == 12 and all(type(n) is int for n in st["tokens_per_expert"])
    assert all(type(st[k]) is float for k in ("dropped_fraction", "unrouted_fraction",
                                               "router_entropy", "loss_load_balance", "loss_z"))
    assert 0 < st["router_entropy"] <= np.log(E)
    assert layer.aux_loss.item() == pytest.approx(0.5 * st["loss_load_balance"] + 1e-2 * st["loss_z"])


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "expert-choice"])
def test_einsum_form_equals_permutation_form(router):
    layer = layer64(router, capacity_factor=1.0)
    x = tm.tensor(np.random.default_rng(7).standard_normal((9, D)), requires_grad=True)
    tm.manual_seed(1)
    y = layer(x)
    tm.manual_seed(1)
    routing = layer.gate(x, layer.capacity(9))
    plan = make_dispatch_plan(routing.expert_index, E,
                              None if layer.gate.uses_capacity_in_routing else layer.capacity(9))
    y2 = moe_einsum(x, routing, plan, layer.experts)
    np.testing.assert_allclose(y.numpy(), y2.numpy(), atol=1e-12)
    (y2 * y2).sum().backward()
    g2 = x.grad.copy()
    x.grad = None
    (y * y).sum().backward()
    np.testing.assert_allclose(x.grad, g2, atol=1e-10)


def test_statistics_and_aux_losses_reported():
    layer = layer64("noisy-topk")
    layer(tm.randn(10, D).double())
    s = layer.last_stats
    assert sum(s["tokens_per_expert"]) <= 20 and 0 <= s["dropped_fraction"] <= 1
    assert {"loss_importance", "loss_load", "loss_z", "router_entropy"} <= set(s)
    assert 0 < s["router_entropy"] <= np.log(E) + 1e-9


def test_layer_errors():
    with pytest.raises(ValueError, match="MoELayer: capacity_factor must be > 0 or None"):
        MoELayer(D, F_, E, capacity_factor=0)
    with pytest.raises(ValueError, match="MoELayer: eval_capacity_factor must be > 0 or None"):
        MoELayer(D, F_, E, eval_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and num_experts=3"):
        MoELayer(D, F_, E, top_k=4)
    with pytest.raises(ValueError, match="unknown router 'soft'; valid routers:"):
        MoELayer(D, F_, E, router="soft")
