"""Float64 gradcheck of every differentiable op, forward values vs NumPy formulas."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

import tinymoe
from tinymoe import gradcheck
from tinymoe.autograd import ops
from tinymoe.nn import functional as F
from strategies import broadcastable_pair, leaf, shapes

FEW = settings(max_examples=12, deadline=None)


# ------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(
    "op, ref",
    [
        (lambda a, b: a + b, np.add),
        (lambda a, b: a - b, np.subtract),
        (lambda a, b: a * b, np.multiply),
        (lambda a, b: a / b, np.divide),
    ],
    ids=["Add", "Sub", "Mul", "Div"],
)
@FEW
@given(pair=broadcastable_pair())
def test_binary_broadcasting(op, ref, pair):
    a, b = leaf(pair[0]), leaf(pair[1], 0.5, 2.0, seed=1)
    np.testing.assert_allclose(op(a, b).data, ref(a.data, b.data))
    gradcheck(op, [a, b])


def test_scalars_and_arrays_on_either_side():
    a = leaf((2, 3))
    arr = np.arange(3.0) + 1
    for f in (lambda x: 2 * x, lambda x: x * 2, lambda x: 1 - x, lambda x: x - arr,
              lambda x: arr / (x + 3), lambda x: arr * x, lambda x: 3.0 / (x + 3)):
        gradcheck(f, [a])


@FEW
@given(shape=shapes())
def test_neg_and_pow(shape):
    a = leaf(shape, 0.5, 2.0)
    gradcheck(lambda x: -x, [a])
    gradcheck(lambda x: x**3, [a])
    gradcheck(lambda x: x**-1.5, [a])
    e = leaf(shape, -1.0, 1.0, seed=3)
    np.testing.assert_allclose((a**e).data, a.data**e.data)
    gradcheck(lambda x, y: x**y, [a, e])  # tensor exponent: d/dy x^y = x^y log x
    gradcheck(lambda y: 2.0**y, [e])


# ------------------------------------------------------------------ unary
UNARY = {
    "Exp": (lambda x: x.exp(), np.exp, (-2, 2)),
    "Log": (lambda x: x.log(), np.log, (0.2, 3)),
    "Sqrt": (lambda x: x.sqrt(), np.sqrt, (0.2, 3)),
    "Abs": (lambda x: x.abs(), np.abs, (0.1, 2)),
    "Tanh": (lambda x: x.tanh(), np.tanh, (-2, 2)),
    "Sigmoid": (lambda x: x.sigmoid(), lambda v: 1 / (1 + np.exp(-v)), (-3, 3)),
    "Relu": (lambda x: x.relu(), lambda v: np.maximum(v, 0), (0.1, 2)),
    "Gelu": (F.gelu, lambda v: 0.5 * v * (1 + erf(v / math.sqrt(2))), (-3, 3)),
    "GeluTanh": (lambda x: F.gelu(x, approximate="tanh"),
                 lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))), (-3, 3)),
    "Silu": (F.silu, lambda v: v / (1 + np.exp(-v)), (-3, 3)),
    "Softplus": (F.softplus, lambda v: np.log1p(np.exp(v)), (-3, 3)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@FEW
@given(shape=shapes())
def test_unary(name, shape):
    f, ref, (lo, hi) = UNARY[name]
    x = leaf(shape, lo, hi)
    if name in ("Abs", "Relu"):  # keep away from the kink at 0
        x.data *= np.where(np.arange(x.data.size).reshape(shape) % 2, 1, -1)
    np.testing.assert_allclose(f(x).data, ref(x.data), rtol=1e-12, atol=1e-12)
    gradcheck(f, [x])


def test_softplus_and_sigmoid_are_stable_for_large_inputs():
    x = tinymoe.tensor(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]), requires_grad=True)
    y = F.softplus(x)
    assert np.all(np.isfinite(y.data)) and y.data[-1] == 1000.0 and y.data[0] == 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [0, 0, 0.5, 1, 1], atol=1e-15)
    assert np.all(np.isfinite(x.sigmoid().data))


# -------------------------------------------------------------- reductions
@st.composite
def shape_and_axis(draw):
    shape = draw(shapes(1, 3))
    axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                          st.just(tuple(range(len(shape)))[:2])))
    return shape, axis, draw(st.booleans())


@FEW
@given(sak=shape_and_axis())
def test_sum_mean_var(sak):
    shape, axis, keep = sak
    x = leaf(shape)
    np.testing.assert_allclose(x.sum(axis, keep).data, x.data.sum(axis=axis, keepdims=keep))
    np.testing.assert_allclose(x.mean(axis, keep).data, x.data.mean(axis=axis, keepdims=keep))
    np.testing.assert_allclose(x.var(axis, keep).data, x.data.var(axis=axis, keepdims=keep))
    gradcheck(lambda t: t.sum(axis, keep), [x])
    gradcheck(lambda t: t.mean(axis, keep), [x])
    gradcheck(lambda t: t.var(axis, keep), [x])
    gradcheck(lambda t: t.logsumexp(axis, keep), [x])


@FEW
@given(sak=shape_and_axis())
def test_max_min(sak):
    shape, axis, keep = sak
    x = leaf(shape)
    np.testing.assert_allclose(x.max(axis, keep).data, x.data.max(axis=axis, keepdims=keep))
    np.testing.assert_allclose(x.min(axis, keep).data, x.data.min(axis=axis, keepdims=keep))
    gradcheck(lambda t: t.max(axis, keep), [x])
    gradcheck(lambda t: t.min(axis, keep), [x])


def test_max_gradient_goes_to_first_maximum():
    x = tinymoe.tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 1, 0], [1, 0, 0]])


def test_logsumexp_stable():
    x = tinymoe.tensor(np.array([1000.0, 1000.0]), requires_grad=True)
    y = x.logsumexp(axis=0)
    assert y.item() == pytest.approx(1000 + math.log(2))
    y.backward()
    np.testing.assert_allclose(x.grad, [0.5, 0.5])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumsum(axis):
    x = leaf((3, 4))
    np.testing.assert_allclose(x.cumsum(axis).data, np.cumsum(x.data, axis=axis))
    gradcheck(lambda t: t.cumsum(axis), [x])


# ------------------------------------------------------------------ shape
def test_shape_ops():
    x = leaf((2, 3, 4))
    gradcheck(lambda t: t.reshape(4, 6), [x])
    gradcheck(lambda t: t.reshape(-1), [x])
    gradcheck(lambda t: t.transpose(2, 0, 1), [x])
    gradcheck(lambda t: t.T, [x])
    gradcheck(lambda t: t.swapaxes(0, 2), [x])
    gradcheck(lambda t: t.permute(1, 2, 0), [x])
    y = leaf((1, 3, 1))
    gradcheck(lambda t: t.broadcast_to((2, 3, 4)), [y])
    gradcheck(lambda t: t.squeeze(), [y])
    gradcheck(lambda t: t.squeeze(0), [y])
    gradcheck(lambda t: t.unsqueeze(1), [y])
    assert y.unsqueeze(-1).shape == (1, 3, 1, 1)
    assert x.transpose(2, 0, 1).shape == (4, 2, 3)


def test_concat_stack_split_pad():
    a, b = leaf((2, 3)), leaf((2, 5), seed=1)
    c = tinymoe.concat([a, b], axis=1)
    np.testing.assert_array_equal(c.data, np.concatenate([a.data, b.data], axis=1))
    gradcheck(lambda u, v: tinymoe.concat([u, v], axis=1), [a, b])
    gradcheck(lambda u, v: tinymoe.concat([u, u, v[:, :3]], axis=0), [a, b])
    s, t = leaf((2, 3)), leaf((2, 3), seed=2)
    gradcheck(lambda u, v: tinymoe.stack([u, v], axis=1), [s, t])
    assert tinymoe.stack([s, t], axis=-1).shape == (2, 3, 2)
    gradcheck(lambda u: u.split([1, 4], axis=1)[1] * 2, [b])  # an unused piece gets zeros
    gradcheck(lambda u: tuple(u.split(3, axis=1)), [leaf((2, 6))])
    gradcheck(lambda u: F.pad(u, ((1, 0), (2, 3)), value=1.5), [a])
    np.testing.assert_array_equal(F.pad(a, ((1, 0), (2, 3))).data, np.pad(a.data, ((1, 0), (2, 3))))


# --------------------------------------------------------------- indexing
def test_getitem_basic_and_advanced():
    x = leaf((4, 5))
    gradcheck(lambda t: t[1:3, ::2], [x])
    gradcheck(lambda t: t[None, 2], [x])
    gradcheck(lambda t: t[..., -1], [x])
    idx = np.array([0, 2, 2, 3, 0])
    gradcheck(lambda t: t[idx], [x])
    gradcheck(lambda t: t[idx, idx], [x])
    gradcheck(lambda t: t[:, [1, 1, 4]], [x])
    gradcheck(lambda t: t[t.data > 0], [x])
    gradcheck(lambda t: t[tinymoe.tensor(idx)], [x])


def test_getitem_repeated_indices_accumulate():
    x = tinymoe.tensor(np.zeros(3), requires_grad=True)
    x[np.array([0, 0, 2, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3, 0, 1])


def test_gather_scatter_index_add():
    x = leaf((3, 4))
    index = np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])
    np.testing.assert_array_equal(F.gather(x, 1, index).data, np.take_along_axis(x.data, index, 1))
    gradcheck(lambda t: F.gather(t, 1, index), [x])
    src = leaf((3, 3), seed=5)
    out = F.scatter_add(x, 1, index, src)
    expect = x.data.copy()
    for i in range(3):
        for j in range(3):
            expect[i, index[i, j]] += src.data[i, j]
    np.testing.assert_allclose(out.data, expect)
    gradcheck(lambda t, s: F.scatter_add(t, 1, index, s), [x, src])
    rows = np.array([2, 0, 2])
    source = leaf((3, 4), seed=6)
    expect = x.data.copy()
    np.add.at(expect, rows, source.data)
    np.testing.assert_allclose(F.index_add(x, 0, rows, source).data, expect)
    gradcheck(lambda t, s: F.index_add(t, 0, rows, s), [x, source])
    gradcheck(lambda t, s: F.index_add(t, 1, np.array([3, 3]), s), [x, leaf((3, 2), seed=8)])


def test_where_and_masked_fill():
    a, b = leaf((3, 4)), leaf((4,), seed=1)
    cond = a.data > 0
    np.testing.assert_array_equal(tinymoe.where(cond, a, b).data, np.where(cond, a.data, b.data))
    gradcheck(lambda u, v: tinymoe.where(cond, u, v), [a, b])
    gradcheck(lambda u: u.masked_fill(cond, -1e9).exp(), [a])
    gradcheck(lambda u: F.masked_fill(u, ~cond, 0.0), [a])


@pytest.mark.parametrize("largest", [True, False])
def test_topk(largest):
    x = leaf((4, 6))
    values, indices = F.topk(x, 3, axis=-1, largest=largest)
    order = np.argsort(-x.data if largest else x.data, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices.data, order)
    np.testing.assert_allclose(values.data, np.take_along_axis(x.data, order, -1))
    assert not indices.requires_grad and indices.dtype.kind == "i"
    gradcheck(lambda t: F.topk(t, 3, axis=-1, largest=largest)[0], [x])
    gradcheck(lambda t: F.topk(t, 2, axis=0)[0], [x])


def test_non_differentiable_index_ops():
    x = tinymoe.tensor([[3.0, 1.0, 2.0]])
    assert tinymoe.argmax(x, axis=1).tolist() == [0]
    assert x.argmin(axis=1).tolist() == [1]
    assert tinymoe.argsort(x, axis=1).tolist() == [[1, 2, 0]]
    oh = tinymoe.one_hot(np.array([2, 0]), 3)
    np.testing.assert_array_equal(oh.data, [[0, 0, 1], [1, 0, 0]])


# ---------------------------------------------------------------- matmul
@pytest.mark.parametrize(
    "sa, sb",
    [((3, 4), (4, 5)), ((2, 3, 4), (4, 2)), ((2, 1, 3, 4), (3, 4, 2)), ((4,), (4, 3)),
     ((3, 4), (4,)), ((5,), (5,)), ((1, 3, 4), (2, 4, 1))],
)
def test_matmul(sa, sb):
    a, b = leaf(sa), leaf(sb, seed=1)
    np.testing.assert_allclose((a @ b).data, a.data @ b.data)
    gradcheck(lambda u, v: u @ v, [a, b])


def test_linear():
    x, w, b = leaf((2, 3, 4)), leaf((5, 4), seed=1), leaf((5,), seed=2)
    np.testing.assert_allclose(F.linear(x, w, b).data, x.data @ w.data.T + b.data)
    gradcheck(lambda u, v, c: F.linear(u, v, c), [x, w, b])
    gradcheck(lambda u, v: F.linear(u, v), [x, w])


# ------------------------------------------------------------ nn ops
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_log_softmax(axis):
    x = leaf((3, 5), -3, 3)
    e = np.exp(x.data - x.data.max(axis=axis, keepdims=True))
    p = e / e.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(F.softmax(x, axis).data, p)
    np.testing.assert_allclose(F.log_softmax(x, axis).data, np.log(p))
    gradcheck(lambda t: F.softmax(t, axis), [x])
    gradcheck(lambda t: F.log_softmax(t, axis), [x])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(reduction):
    logits = leaf((2, 3, 5), -3, 3)
    targets = np.array([[0, 4, -100], [2, 2, 1]])
    out = F.cross_entropy(logits, targets, reduction=reduction)
    z = logits.data.reshape(-1, 5)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    t = targets.reshape(-1)
    per = np.array([0.0 if ti == -100 else -logp[i, ti] for i, ti in enumerate(t)])
    expect = {"mean": per.sum() / 5, "sum": per.sum(), "none": per.reshape(2, 3)}[reduction]
    np.testing.assert_allclose(out.data, expect)
    gradcheck(lambda u: F.cross_entropy(u, targets, reduction=reduction), [logits])


def test_cross_entropy_is_stable():
    logits = tinymoe.tensor(np.array([[1e4, 0.0, -1e4]]), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([1]))
    assert loss.item() == pytest.approx(1e4)
    loss.backward()
    assert np.all(np.isfinite(logits.grad))


@FEW
@given(shape=shapes(1, 3))
def test_layer_norm_rms_norm(shape):
    x = leaf(shape)
    d = shape[-1]
    w, b = leaf((d,), 0.5, 1.5, seed=1), leaf((d,), seed=2)
    xhat = (x.data - x.data.mean(-1, keepdims=True)) / np.sqrt(x.data.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(F.layer_norm(x, w, b).data, xhat * w.data + b.data, atol=1e-12)
    r = 1 / np.sqrt((x.data**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(F.rms_norm(x, w).data, x.data * r * w.data, atol=1e-12)
    gradcheck(lambda u, v, c: F.layer_norm(u, v, c), [x, w, b], atol=1e-5, rtol=1e-4)
    gradcheck(lambda u, v: F.rms_norm(u, v), [x, w], atol=1e-5, rtol=1e-4)


def test_embedding():
    w = leaf((6, 3))
    ids = np.array([[0, 5, 5], [2, 0, 1]])
    np.testing.assert_array_equal(F.embedding(ids, w).data, w.data[ids])
    gradcheck(lambda t: F.embedding(ids, t), [w])
    gradcheck(lambda t: F.embedding(tinymoe.tensor(ids), t), [w])


def test_dropout():
    x = leaf((50, 40))
    tinymoe.manual_seed(3)
    y = F.dropout(x, 0.25)
    kept = y.data != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y.data[kept], x.data[kept] / 0.75)
    tinymoe.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.25).data, y.data)  # seeded: reproducible
    assert F.dropout(x, 0.25, training=False) is x

    def fixed_mask(t):
        tinymoe.manual_seed(4)  # the same mask on every call of gradcheck
        return F.dropout(t, 0.5)

    gradcheck(fixed_mask, [leaf((3, 4))])


@pytest.mark.parametrize("K", [1, 2, 4])
def test_conv1d_causal(K):
    x, w, b = leaf((2, 3, 7)), leaf((3, 1, K), seed=1), leaf((3,), seed=2)
    y = F.conv1d_causal(x, w, b).data
    expect = np.zeros_like(y)
    for t in range(7):
        for k in range(K):
            s = t + k - (K - 1)
            if s >= 0:
                expect[:, :, t] += w.data[None, :, 0, k] * x.data[:, :, s]
    np.testing.assert_allclose(y, expect + b.data[None, :, None])
    gradcheck(lambda u, v, c: F.conv1d_causal(u, v, c), [x, w, b])
    gradcheck(lambda u, v: F.conv1d_causal(u, v), [x, w])


def test_conv1d_causal_never_sees_the_future():
    x = tinymoe.tensor(np.zeros((1, 1, 6)), requires_grad=True)
    w = tinymoe.tensor(np.ones((1, 1, 3)))
    F.conv1d_causal(x, w)[0, 0, 2].backward()
    np.testing.assert_array_equal(x.grad[0, 0], [1, 1, 1, 0, 0, 0])


def test_to_device_and_cast_in_graph():
    x = leaf((2, 2))
    gradcheck(lambda t: t.to("cpu") * 2, [x])
    x.grad = None
    y = x.float()
    assert y.dtype == np.float32
    (y * 3).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 3)


def test_every_op_in_the_ops_module_is_gradchecked_here():
    """A new Function in tinymoe.autograd.ops must get a gradcheck in this file."""
    import inspect

    from tinymoe.autograd import Function

    source = open(__file__).read()
    names = {n for n, v in vars(ops).items() if inspect.isclass(v) and issubclass(v, Function)}
    covered = {
        "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Exp", "Log", "Sqrt", "Abs", "Tanh", "Sigmoid",
        "Relu", "Gelu", "Silu", "Softplus", "Sum", "Mean", "Var", "Max", "Min", "LogSumExp",
        "Cumsum", "Reshape", "Transpose", "BroadcastTo", "Concat", "Stack", "Split", "Pad",
        "GetItem", "Gather", "ScatterAdd", "IndexAdd", "Where", "TopK", "MatMul",
        "LinearFunction", "Softmax", "LogSoftmax", "CrossEntropy", "LayerNorm", "RMSNorm",
        "Embedding", "Dropout", "Conv1dCausal", "ToDevice", "Cast",
    }
    assert names == covered, f"ops without a test here: {sorted(names - covered)}"
    assert "gradcheck" in source
