"""Optimizers, schedule and clipping, checked against hand-computed steps."""
import json
import math

import numpy as np
import pytest

from tinymoe import backend
from tinymoe.autograd import Tensor
from tinymoe.optim import SGD, AdamW, WarmupCosine, clip_grad_norm_, lr_at


def param(values):
    return Tensor(np.array(values, dtype=np.float64), requires_grad=True)


# ------------------------------------------------------------------------ SGD
def test_sgd_plain_step():
    p = param([1.0, -2.0])
    p.grad = np.array([0.5, 4.0])
    SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [1.0 - 0.05, -2.0 - 0.4], rtol=0, atol=1e-15)


def test_sgd_momentum_two_steps_by_hand():
    p = param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.array([2.0])
    opt.step()  # v = 2,  p = 1 - 0.1 * 2 = 0.8
    np.testing.assert_allclose(p.data, [0.8], atol=1e-15)
    p.grad = np.array([1.0])
    opt.step()  # v = 0.9 * 2 + 1 = 2.8,  p = 0.8 - 0.28 = 0.52
    np.testing.assert_allclose(p.data, [0.52], atol=1e-15)


def test_sgd_nesterov_and_weight_decay_by_hand():
    p = param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.2)
    p.grad = np.array([1.0])
    opt.step()  # g = 1 + 0.2 * 1 = 1.2, v = 1.2, step = g + 0.5 v = 1.8, p = 1 - 0.18
    np.testing.assert_allclose(p.data, [0.82], atol=1e-15)
    p.grad = np.array([0.0])
    opt.step()  # g = 0.2 * 0.82 = 0.164, v = 0.6 + 0.164 = 0.764, step = 0.164 + 0.382
    np.testing.assert_allclose(p.data, [0.82 - 0.1 * (0.164 + 0.5 * 0.764)], atol=1e-15)


def test_sgd_skips_parameters_without_grad():
    p, q = param([1.0]), param([3.0])
    p.grad = np.array([1.0])
    SGD([p, q], lr=1.0, momentum=0.9).step()
    assert p.data[0] == 0.0 and q.data[0] == 3.0


# ---------------------------------------------------------------------- AdamW
def adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """The textbook AdamW, written independently of tinymoe.optim.adamw."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_constant_gradient_moves_lr_per_step():
    # With a constant gradient the bias-corrected m_hat = g, v_hat = g^2, so with
    # eps = 0 every step moves exactly lr against the sign of g: 1 -> 0.9 -> 0.8.
    p = param([1.0, -1.0])
    opt = AdamW([p], lr=0.1, eps=0.0, weight_decay=0.0)
    for expected in ([0.9, -0.9], [0.8, -0.8]):
        p.grad = np.array([0.5, -3.0])
        opt.step()
        np.testing.assert_allclose(p.data, expected, atol=1e-14)


def test_adamw_decay_is_decoupled():
    # Zero gradient: the Adam part is 0 / (0 + eps) = 0, only p *= 1 - lr * wd is left
    # (coupled L2 decay would instead feed wd * p through m / sqrt(v): a full lr step).
    p = param([2.0])
    p.grad = np.array([0.0])
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.data, [2.0 * (1 - 0.05)], atol=1e-15)


def test_adamw_matches_formula_over_several_steps():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 5))
    grads = [rng.standard_normal((3, 5)) for _ in range(4)]
    p = param(p0)
    opt = AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads:
        p.grad = g
        opt.step()
    expected = adamw_reference(p0, grads, 0.01, 0.8, 0.95, 1e-6, 0.1)
    np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_adamw_param_groups_have_their_own_settings():
    a, b = param([1.0]), param([1.0])
    opt = AdamW([{"params": [a], "weight_decay": 0.0}, {"params": [b], "lr": 0.5}],
                lr=0.1, eps=0.0, weight_decay=0.5)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.5
    a.grad, b.grad = np.array([1.0]), np.array([1.0])
    opt.step()
    np.testing.assert_allclose(a.data, [1.0 - 0.1], atol=1e-15)                 # no decay
    np.testing.assert_allclose(b.data, [1.0 * (1 - 0.25) - 0.5], atol=1e-15)  # decay, lr 0.5


def test_optimizer_zero_grad():
    p = param([1.0])
    p.grad = np.array([1.0])
    opt = SGD([p], lr=0.1)
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("make", [lambda p: AdamW(p, lr=0.05), lambda p: SGD(p, lr=0.05, momentum=0.9)])
def test_state_dict_round_trip_continues_identically(make):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(4)
    grads = [rng.standard_normal(4) for _ in range(6)]
    a = param(p0)
    opt_a = make([a])
    for g in grads:
        a.grad = g
        opt_a.step()

    b = param(p0)
    opt_b = make([b])
    for g in grads[:3]:
        b.grad = g
        opt_b.step()
    arrays, meta = opt_b.state_dict()
    meta = json.loads(json.dumps(meta))  # must survive JSON (checkpoints store it so)
    c = param(b.data.copy())
    opt_c = make([c])
    opt_c.load_state_dict(arrays, meta)
    for g in grads[3:]:
        c.grad = g
        opt_c.step()
    np.testing.assert_array_equal(c.data, a.data)


def test_load_state_dict_errors_name_the_problem():
    p = param([1.0, 2.0])
    opt = AdamW([p])
    p.grad = np.ones(2)
    opt.step()
    arrays, meta = opt.state_dict()
    with pytest.raises(ValueError, match=r"saved groups hold \[1\] parameters.*\[2\]"):
        AdamW([param([1.0]), param([2.0])]).load_state_dict(arrays, meta)
    with pytest.raises(ValueError, match=r"state.0.exp_avg has shape \(2,\), parameter 0 has shape \(3,\)"):
        AdamW([param([1.0, 2.0, 3.0])]).load_state_dict(arrays, meta)
    with pytest.raises(ValueError, match="saved by AdamW"):
        SGD([p]).load_state_dict(arrays, meta)


def test_optimizer_bad_arguments():
    p = param([1.0])
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['momentum'\]"):
        AdamW([{"params": [p], "momentum": 0.9}])
    with pytest.raises(ValueError, match="appears in two groups"):
        SGD([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="requires_grad=True"):
        SGD([Tensor(np.ones(2))])
    with pytest.raises(ValueError, match="betas must be two numbers in"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        SGD([p], nesterov=True)
    with pytest.raises(ValueError, match="lr, momentum and weight_decay must be >= 0"):
        SGD([p], lr=-1.0)


# ------------------------------------------------------------------- schedule
def test_lr_at_warmup_then_cosine():
    kw = dict(max_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert [lr_at(t, **kw) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0                                   # start of the cosine
    assert lr_at(9, **kw) == pytest.approx(0.55)                   # half way: (max + min) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1)                   # the floor
    assert lr_at(100, **kw) == pytest.approx(0.1)                  # stays there
    s = 3 / 10
    assert lr_at(7, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s)))
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        lr_at(0, 1.0, warmup_steps=10, total_steps=5)


def test_warmup_cosine_sets_each_group_and_resumes():
    a, b = param([1.0]), param([1.0])
    opt = SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], lr=0.5)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    seen = [sched.get_last_lr()]
    for _ in range(11):
        sched.step()
        seen.append(sched.get_last_lr())
    assert seen[0] == [0.5, 0.05] and seen[1] == [1.0, 0.1]
    assert seen[10] == pytest.approx([0.1, 0.01]) and seen[11] == pytest.approx([0.1, 0.01])
    assert all(x[1] == pytest.approx(x[0] / 10) for x in seen)

    # A fresh scheduler made with start_step=n picks up where the first left off.
    opt2 = SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], lr=0.5)
    sched2 = WarmupCosine(opt2, warmup_steps=2, total_steps=10, start_step=6)
    assert sched2.get_last_lr() == seen[6]


# ---------------------------------------------------------------------- clip
def test_clip_grad_norm_scales_all_gradients_together():
    p, q, r = param([0.0, 0.0]), param([0.0]), param([0.0])
    p.grad, q.grad = np.array([3.0, 0.0]), np.array([4.0])   # global norm 5
    total = clip_grad_norm_([p, q, r], max_norm=1.0)
    assert total == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad, [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(q.grad, [0.8], rtol=1e-6)
    assert r.grad is None


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = param([0.0, 0.0])
    p.grad = np.array([0.3, 0.4])
    assert clip_grad_norm_([p], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(p.grad, [0.3, 0.4])
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm_([p], max_norm=0.0)


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs an NVIDIA GPU and CuPy")
@pytest.mark.parametrize("make", [lambda p: AdamW(p, lr=0.01, weight_decay=0.1),
                                  lambda p: SGD(p, lr=0.01, momentum=0.9, nesterov=True)])
def test_optimizers_on_gpu_match_cpu(make):
    cp = backend.cupy()
    rng = np.random.default_rng(2)
    p0, grads = rng.standard_normal((5, 3)), [rng.standard_normal((5, 3)) for _ in range(3)]
    cpu, gpu = param(p0), Tensor(cp.asarray(p0), requires_grad=True)
    opt_cpu, opt_gpu = make([cpu]), make([gpu])
    for g in grads:
        cpu.grad, gpu.grad = g, cp.asarray(g)
        opt_cpu.step()
        opt_gpu.step()
    assert clip_grad_norm_([gpu], 1e-3) == pytest.approx(clip_grad_norm_([cpu], 1e-3))
    np.testing.assert_allclose(cp.asnumpy(gpu.data), cpu.data, rtol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(gpu.grad), cpu.grad, rtol=1e-12)
