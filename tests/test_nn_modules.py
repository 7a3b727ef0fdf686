"""nn: Module bookkeeping, the layers (values and float64 gradcheck), an MLP on XOR."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe
from tinymoe import backend, gradcheck
from tinymoe.autograd import Tensor
from tinymoe.nn import (
    F, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter, RMSNorm, Sequential,
)
from tinymoe.optim import SGD, AdamW

small = settings(max_examples=6, deadline=None)


def randn(*shape, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


class Block(Module):
    def __init__(self):
        super().__init__()
        self.fc = Linear(3, 4)
        self.norm = LayerNorm(4)


class Net(Module):
    def __init__(self, tie=False):
        super().__init__()
        self.emb = Embedding(10, 3)
        self.blocks = ModuleList([Block(), Block()])
        self.head = Linear(3, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.register_buffer("scale", np.ones(3, dtype=np.float32))


# ------------------------------------------------------------------- Module
def test_named_parameters_are_dotted_paths_in_definition_order():
    names = [name for name, _ in Net().named_parameters()]
    assert names == [
        "emb.weight",
        "blocks.0.fc.weight", "blocks.0.fc.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
        "blocks.1.fc.weight", "blocks.1.fc.bias", "blocks.1.norm.weight", "blocks.1.norm.bias",
        "head.weight",
    ]
    assert all(isinstance(p, Parameter) and p.requires_grad for p in Net().parameters())


def test_num_parameters_and_tied_weights_counted_once():
    block = 3 * 4 + 4 + 4 + 4
    assert Net().num_parameters() == 10 * 3 + 2 * block + 10 * 3
    tied = Net(tie=True)
    assert tied.num_parameters() == 10 * 3 + 2 * block
    assert "head.weight" not in dict(tied.named_parameters())    # an optimizer updates it once
    sd = tied.state_dict()
    assert sd["head.weight"] is sd["emb.weight"]                 # but both names are saved
    assert "scale" in sd


def test_state_dict_round_trip():
    tinymoe.manual_seed(0)
    a = Net()
    tinymoe.manual_seed(1)
    b = Net()
    assert not np.array_equal(a.head.weight.data, b.head.weight.data)
    weight_before = b.head.weight
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert b.head.weight is weight_before  # copied in place: optimizers keep their Parameters


def test_load_state_dict_names_every_bad_key_with_shapes():
    sd = Net().state_dict()
    del sd["blocks.1.fc.bias"]
    sd["blocks.0.fc.weight"] = np.zeros((5, 3), dtype=np.float32)
    sd["extra.weight"] = np.zeros(2, dtype=np.float32)
    with pytest.raises(RuntimeError) as err:
        Net().load_state_dict(sd)
    msg = str(err.value)
    assert "does not fit Net" in msg
    assert "mis-shaped keys: blocks.0.fc.weight: checkpoint (5, 3) vs model (4, 3)" in msg
    assert "missing keys: blocks.1.fc.bias" in msg
    assert "unexpected keys: extra.weight" in msg


def test_load_state_dict_not_strict_allows_missing_and_unexpected_but_not_shapes():
    sd = Net().state_dict()
    del sd["head.weight"]
    sd["other"] = np.zeros(1)
    missing, unexpected = Net().load_state_dict(sd, strict=False)
    assert missing == ["head.weight"] and unexpected == ["other"]
    sd["emb.weight"] = np.zeros((1, 1))
    with pytest.raises(RuntimeError, match=r"emb.weight: checkpoint \(1, 1\) vs model \(10, 3\)"):
        Net().load_state_dict(sd, strict=False)


def test_train_eval_reach_every_submodule():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_and_to_dtype():
    net = Net()
    for p in net.parameters():
        p.grad = np.ones_like(p.data)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    params = list(net.parameters())
    net.to(dtype=np.float64)
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in net.parameters()) and net.scale.dtype == np.float64
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        net.to("tpu")


def test_registration_rules_and_errors():
    class Forgot(Module):
        def __init__(self):
            self.fc = Linear(2, 2)

    with pytest.raises(RuntimeError, match=r"Forgot: call super\(\).__init__\(\) before assigning 'fc'"):
        Forgot()
    lin = Linear(2, 3)
    with pytest.raises(TypeError, match="cannot assign ndarray to parameter 'weight'"):
        lin.weight = np.zeros((3, 2))
    lin.bias = None
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    with pytest.raises(TypeError, match="Parameter: needs floating-point data, got int64"):
        Parameter(np.arange(3))
    with pytest.raises(TypeError, match="ModuleList.append: expected a Module, got int"):
        ModuleList([1])
    with pytest.raises(NotImplementedError, match="Module has no forward"):
        Module()(1)


def test_containers_and_repr():
    seq = Sequential(Linear(2, 3), Dropout(0.5), Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[1], Dropout) and isinstance(seq[-1], Linear)
    assert isinstance(seq[:2], Sequential) and len(seq[:2]) == 2
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = np.ones((4, 2), dtype=np.float32)
    seq.eval()
    expected = (x @ seq[0].weight.data.T + seq[0].bias.data) @ seq[2].weight.data.T + seq[2].bias.data
    np.testing.assert_allclose(seq(x).data, expected, rtol=1e-6)
    assert repr(seq) == (
        "Sequential(\n"
        "  (0): Linear(in_features=2, out_features=3, bias=True)\n"
        "  (1): Dropout(p=0.5)\n"
        "  (2): Linear(in_features=3, out_features=1, bias=True)\n"
        ")"
    )


# ------------------------------------------------------------------- layers
def test_linear_init_is_uniform_in_bound_and_seeded():
    tinymoe.manual_seed(3)
    a = Linear(400, 50)
    tinymoe.manual_seed(3)
    b = Linear(400, 50)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.shape == (50, 400) and a.weight.dtype == np.float32
    bound = 1 / np.sqrt(400)
    w = a.weight.data
    assert w.min() >= -bound and w.max() <= bound and w.max() > 0.95 * bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound  # std of U(-a, a) is a / sqrt(3)


@small
@given(batch=st.sampled_from([(), (1,), (2, 3)]), n_in=st.integers(1, 4),
       n_out=st.integers(1, 3), bias=st.booleans())
def test_linear_value_and_gradcheck(batch, n_in, n_out, bias):
    lin = Linear(n_in, n_out, bias=bias, dtype=np.float64)
    x = randn(*batch, n_in)
    expected = x.data @ lin.weight.data.T + (lin.bias.data if bias else 0)
    np.testing.assert_allclose(lin(x).data, expected, rtol=1e-12)
    params = [lin.weight] + ([lin.bias] if bias else [])
    gradcheck(lambda x, *ps: lin(x), [x, *params])


@small
@given(shape=st.sampled_from([(1,), (2, 3), (4,)]), vocab=st.integers(1, 5), dim=st.integers(1, 3))
def test_embedding_value_and_gradcheck(shape, vocab, dim):
    emb = Embedding(vocab, dim, dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, vocab, size=shape)
    np.testing.assert_array_equal(emb(ids).data, emb.weight.data[ids])
    gradcheck(lambda w: emb(ids), [emb.weight])  # repeated ids accumulate


@small
@given(batch=st.sampled_from([(1,), (2, 3)]), dim=st.integers(2, 5))
def test_layer_norm_value_and_gradcheck(batch, dim):
    ln = LayerNorm(dim, dtype=np.float64)
    ln.weight.data[:] = np.linspace(0.5, 1.5, dim)
    ln.bias.data[:] = np.linspace(-1, 1, dim)
    x = randn(*batch, dim)
    mu, var = x.data.mean(-1, keepdims=True), x.data.var(-1, keepdims=True)
    expected = (x.data - mu) / np.sqrt(var + 1e-5) * ln.weight.data + ln.bias.data
    np.testing.assert_allclose(ln(x).data, expected, rtol=1e-10, atol=1e-12)
    gradcheck(lambda x, w, b: ln(x), [x, ln.weight, ln.bias])


@small
@given(batch=st.sampled_from([(1,), (2, 3)]), dim=st.integers(1, 5))
def test_rms_norm_value_and_gradcheck(batch, dim):
    rms = RMSNorm(dim, dtype=np.float64)
    rms.weight.data[:] = np.linspace(0.5, 1.5, dim)
    x = randn(*batch, dim)
    expected = x.data / np.sqrt((x.data**2).mean(-1, keepdims=True) + 1e-5) * rms.weight.data
    np.testing.assert_allclose(rms(x).data, expected, rtol=1e-10)
    gradcheck(lambda x, w: rms(x), [x, rms.weight])


def test_dropout_eval_is_identity_and_gradcheck():
    drop = Dropout(0.4).eval()
    x = randn(3, 4)
    assert drop(x) is x
    drop.train()

    def with_fixed_mask(x):
        tinymoe.manual_seed(7)  # the same mask on every call of gradcheck
        return drop(x)

    y = with_fixed_mask(x).data
    kept = y != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(y[kept], x.data[kept] / 0.6, rtol=1e-12)
    gradcheck(with_fixed_mask, [x])
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


def test_layers_report_bad_input_shapes():
    with pytest.raises(ValueError, match=r"linear: input has 5 features but weight \(3, 4\) expects 4"):
        Linear(4, 3)(np.ones((2, 5), dtype=np.float32))


# ---------------------------------------------------------------------- XOR
@pytest.mark.parametrize("make_opt", [lambda p: AdamW(p, lr=0.05, weight_decay=0.0),
                                      lambda p: SGD(p, lr=0.5, momentum=0.9)])
def test_mlp_learns_xor(make_opt):
    tinymoe.manual_seed(0)
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    mlp = Sequential(Linear(2, 8), _Tanh(), Linear(8, 2))
    opt = make_opt(mlp.parameters())
    for _ in range(300):
        loss = F.cross_entropy(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    np.testing.assert_array_equal(mlp(x).data.argmax(-1), y)


class _Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs an NVIDIA GPU and CuPy")
def test_module_to_cuda_and_back():
    net = Net()
    sd = {k: v.copy() for k, v in net.state_dict().items()}
    net.to("cuda")
    assert all(p.device == "cuda" for p in net.parameters())
    ids = backend.cupy().asarray([[1, 2, 3]])
    block = net.blocks[0]
    h = block.norm(block.fc(net.emb(ids)))
    assert h.device == "cuda"
    h.sum().backward()
    assert net.emb.weight.grad is not None and backend.device_of(net.emb.weight.grad) == "cuda"
    net.load_state_dict(sd)  # NumPy arrays into CuPy parameters
    net.to("cpu")
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, sd[name], err_msg=name)
