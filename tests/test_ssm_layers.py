"""SSM layers on the autograd engine: gradchecks, modes that must agree, bad input."""
import numpy as np
import pytest

import tinymoe
from tinymoe.nn.ssm import S4D, CausalConv1d, MambaBlock, selective_scan


def t64(rng, *shape, positive=False):
    a = rng.uniform(0.1, 0.6, shape) if positive else rng.standard_normal(shape)
    return tinymoe.tensor(a, requires_grad=True, dtype=np.float64)


@pytest.mark.parametrize("impl", ["reference", "assoc", "numba"])
@pytest.mark.parametrize("softplus,with_optional", [(True, True), (False, False)])
def test_selective_scan_gradcheck(impl, softplus, with_optional):
    rng = np.random.default_rng(0)
    b, d, L, N = 2, 3, 4, 2
    A = tinymoe.tensor(-np.exp(rng.standard_normal((d, N))), requires_grad=True)
    args = [t64(rng, b, d, L), t64(rng, b, d, L, positive=True), A, t64(rng, b, N, L),
            t64(rng, b, N, L)]
    if with_optional:
        args += [t64(rng, d), t64(rng, b, d, L), t64(rng, d, positive=True)]
    report = tinymoe.gradcheck(
        lambda *a: selective_scan(*a, delta_softplus=softplus, impl=impl), args)
    assert len(report) == len(args)


def test_selective_scan_skips_unneeded_grads():
    rng = np.random.default_rng(1)
    u = t64(rng, 1, 2, 3)
    out = selective_scan(u, np.full((1, 2, 3), 0.3), -np.ones((2, 2)), np.ones((1, 2, 3)),
                         np.ones((1, 2, 3)))
    out.sum().backward()
    assert u.grad.shape == (1, 2, 3)


def test_selective_scan_shape_error_names_argument():
    with pytest.raises(ValueError, match=r"C must be \(batch, N, L\)"):
        selective_scan(np.ones((1, 2, 3)), np.ones((1, 2, 3)), -np.ones((2, 2)),
                       np.ones((1, 2, 3)), np.ones((1, 3, 3)))


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_s4d_gradcheck(mode):
    layer = S4D(3, d_state=2, mode=mode).to(dtype=np.float64)
    x = tinymoe.tensor(np.random.default_rng(0).standard_normal((2, 5, 3)), requires_grad=True)
    tinymoe.gradcheck(lambda x, *p: layer(x), [x, *layer.parameters()])


def test_s4d_modes_agree_and_are_causal():
    layer = S4D(4, d_state=3).to(dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 11, 4))
    conv = layer(x).data
    layer.mode = "recurrent"
    np.testing.assert_allclose(conv, layer(x).data, rtol=1e-10, atol=1e-12)
    x2 = x.copy()
    x2[:, 6:] = 0.0                                               # the future must not matter
    np.testing.assert_allclose(layer(x2).data[:, :6], conv[:, :6], rtol=1e-10, atol=1e-12)


def test_s4d_bad_input():
    with pytest.raises(ValueError, match="S4D: d_model and d_state must be >= 1"):
        S4D(4, d_state=0)
    with pytest.raises(ValueError, match=r"S4D: expected x \(B, L, 4\), got \(2, 3\)"):
        S4D(4)(np.ones((2, 3)))


def test_causal_conv_step_matches_forward():
    conv = CausalConv1d(3, 4).to(dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((2, 3, 6))
    full = conv(x).data
    state = np.zeros((2, 3, 4))
    for t in range(6):
        np.testing.assert_allclose(conv.step(x[:, :, t], state), full[:, :, t], rtol=1e-12)


def small_block(**kw):
    return MambaBlock(4, d_state=2, d_conv=3, expand=2, **kw).to(dtype=np.float64)


def test_mamba_block_gradcheck():
    block = small_block()
    x = tinymoe.tensor(np.random.default_rng(3).standard_normal((2, 4, 4)), requires_grad=True)
    report = tinymoe.gradcheck(lambda x, *p: block(x), [x, *block.parameters()])
    assert len(report) == 1 + len(list(block.parameters()))


def test_mamba_block_names_and_init():
    block = MambaBlock(32, d_state=16)
    names = {n for n, _ in block.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                     "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    assert block.in_proj.weight.shape == (128, 32) and block.conv1d.weight.shape == (64, 1, 4)
    assert block.x_proj.weight.shape == (2 + 32, 64) and block.dt_proj.weight.shape == (64, 2)
    np.testing.assert_allclose(np.exp(block.A_log.data[5]), np.arange(1, 17), rtol=1e-6)
    dt0 = np.log1p(np.exp(block.dt_proj.bias.data.astype(np.float64)))  # softplus(bias)
    assert dt0.min() >= 1e-3 * 0.999 and dt0.max() <= 1e-1 * 1.001
    np.testing.assert_array_equal(block.D.data, 1.0)


@pytest.mark.parametrize("impl", ["reference", "numba"])
def test_mamba_step_equals_forward(impl):
    block = small_block(impl=impl)
    x = np.random.default_rng(4).standard_normal((3, 9, 4))
    full = block(x).data
    state = block.allocate_state(3)
    steps = np.stack([block.step(x[:, t], state).data for t in range(9)], axis=1)
    np.testing.assert_allclose(steps, full, rtol=1e-10, atol=1e-12)
    assert state[0].shape == (3, 8, 3) and state[1].shape == (3, 8, 2)


def test_mamba_block_bad_input():
    with pytest.raises(ValueError, match="MambaBlock: d_state must be >= 1, got 0"):
        MambaBlock(4, d_state=0)
    with pytest.raises(ValueError, match="MambaBlock: d_conv must be >= 1, got 0"):
        MambaBlock(4, d_conv=0)
    with pytest.raises(ValueError, match=r"expected x \(B, L, d_model=4\), got \(2, 5, 3\)"):
        MambaBlock(4)(np.ones((2, 5, 3), np.float32))
