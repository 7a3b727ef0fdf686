"""The engine itself: deep graphs, freeing, no_grad, hooks, and the error messages."""
import gc
import weakref

import numpy as np
import pytest

import tinymoe
from tinymoe.autograd import Function, add_op_hook, gradcheck
from tinymoe.autograd.gradcheck import GradcheckError
from tinymoe.nn import functional as F


def test_chain_of_20000_ops_backpropagates_without_recursion_error():
    x = tinymoe.tensor([1.0], requires_grad=True, dtype=np.float64)
    y = x
    for _ in range(20000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001**20000], rtol=1e-9)


def test_graph_is_freed_after_backward_unless_retained():
    x = tinymoe.tensor(np.ones(3), requires_grad=True)
    hidden = x * 2
    ref = weakref.ref(hidden)
    out = (hidden.exp()).sum()
    del hidden
    gc.collect()
    assert ref() is not None  # the graph keeps the intermediate alive...
    out.backward()
    gc.collect()
    assert ref() is None  # ...until backward frees it
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        out.backward()


def test_retain_graph_allows_a_second_backward_and_grads_accumulate():
    x = tinymoe.tensor(np.array([1.0, 2.0]), requires_grad=True)
    out = (x * x).sum()
    out.backward(retain_graph=True)
    out.backward()
    np.testing.assert_allclose(x.grad, 2 * 2 * x.data)


def test_shared_subexpressions_accumulate():
    x = tinymoe.tensor(np.array([0.5, -1.5]), requires_grad=True)
    gradcheck(lambda t: (lambda s: s * s + s.exp() * s)(t.tanh()), [x])


def test_no_grad_records_nothing():
    x = tinymoe.tensor([1.0], requires_grad=True)
    with tinymoe.no_grad():
        y = x * 2
    assert not y.requires_grad and y._ctx is None

    @tinymoe.no_grad()
    def f(t):
        return t * 3

    assert not f(x).requires_grad
    assert (x * 2).requires_grad


def test_leaf_grads_are_owned_arrays():
    # z = x + y hands the same gradient array to both leaves: they must not alias.
    x, y = tinymoe.tensor([1.0], requires_grad=True), tinymoe.tensor([2.0], requires_grad=True)
    (x + y).sum().backward()
    x.grad *= 10
    assert y.grad[0] == 1.0


def test_detach_and_item():
    x = tinymoe.tensor([[2.0]], requires_grad=True)
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    assert (x * 3).item() == 6.0


def test_numpy_arrays_and_python_numbers_are_accepted():
    x = tinymoe.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = np.array([3.0, 4.0]) * x + 1
    assert isinstance(y, tinymoe.Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_default_dtype_is_float32_like_pytorch():
    assert tinymoe.tensor([1.0, 2.0]).dtype == np.float32
    assert tinymoe.tensor(np.array([1.0])).dtype == np.float64
    assert tinymoe.tensor([1, 2]).dtype.kind == "i"
    assert tinymoe.randn(2, 3).dtype == np.float32
    assert tinymoe.zeros(2, dtype="float64").dtype == np.float64


def test_manual_seed_makes_random_tensors_reproducible():
    tinymoe.manual_seed(5)
    a = tinymoe.randn(4).numpy()
    tinymoe.manual_seed(5)
    np.testing.assert_array_equal(a, tinymoe.randn(4).numpy())


def test_op_hooks_see_forward_and_backward():
    events = []
    handle = add_op_hook(lambda e: events.append((e.op, e.phase, [a.shape for a in e.inputs if hasattr(a, "shape")])))
    x = tinymoe.tensor(np.ones((2, 3)), requires_grad=True)
    (x @ np.ones((3, 4))).sum().backward()
    handle.remove()
    (x * 2).sum()
    assert ("MatMul", "forward", [(2, 3), (3, 4)]) in events
    assert ("Sum", "forward", [(2, 4)]) in events
    assert [e[:2] for e in events if e[1] == "backward"] == [("Sum", "backward"), ("MatMul", "backward")]
    assert len(events) == 4


# ------------------------------------------------------------------- errors
def test_shape_mismatch_names_the_op_and_both_shapes():
    a, b = tinymoe.ones(2, 3), tinymoe.ones(4)
    with pytest.raises(ValueError, match=r"Add: .*\(2, ?3\).*\(4,?\)"):
        a + b
    with pytest.raises(ValueError, match=r"matmul: inner dimensions differ: \(2, 3\) @ \(4, 2\)"):
        a @ tinymoe.ones(4, 2)
    with pytest.raises(ValueError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\) into \(4,\)"):
        a.reshape(4)
    with pytest.raises(ValueError, match=r"linear: input has 3 features but weight \(5, 4\)"):
        F.linear(a, tinymoe.ones(5, 4))
    with pytest.raises(ValueError, match=r"concat: shapes \[\(2, 3\), \(4,\)\]"):
        tinymoe.concat([a, b])
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(4,\), expected \(3,\)"):
        F.layer_norm(a, tinymoe.ones(4))
    with pytest.raises(ValueError, match=r"cross_entropy: logits \(2, 3\) need targets of shape \(2,\), got \(3,\)"):
        F.cross_entropy(a, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"conv1d_causal: expected x \(B, C, L\) and weight \(C, 1, K\)"):
        F.conv1d_causal(tinymoe.ones(1, 3, 5), tinymoe.ones(2, 1, 4))
    with pytest.raises(ValueError, match=r"topk: k=4 must be in \[1, 3\]"):
        F.topk(a, 4)


def test_integer_tensors_are_refused_by_float_ops():
    ints = tinymoe.tensor([1, 2, 3])
    with pytest.raises(TypeError, match=r"Exp: expected a floating-point tensor as input 0, got int64\(3,\)"):
        ints.exp()
    with pytest.raises(TypeError, match=r"Softmax: expected a floating-point tensor"):
        F.softmax(tinymoe.tensor([True, False]))
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        tinymoe.tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="embedding: ids must be integers"):
        F.embedding(np.array([0.5]), tinymoe.ones(3, 2))
    assert (ints * 2).tolist() == [2, 4, 6]  # integer arithmetic itself is fine


def test_backward_on_non_scalar_needs_a_gradient():
    x = tinymoe.tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"backward: output has shape \(2, 2\)"):
        (x * 2).backward()
    (x * 2).backward(np.ones((2, 2)))
    np.testing.assert_array_equal(x.grad, 2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        tinymoe.ones(2).sum().backward()


def test_custom_function_and_gradcheck_failure_names_the_op():
    class BadSquare(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved
            return grad * x  # wrong: should be 2 x

    x = tinymoe.tensor(np.array([1.0, 2.0]), requires_grad=True)
    with pytest.raises(GradcheckError, match="gradcheck failed for BadSquare, input 0"):
        gradcheck(lambda t: BadSquare.apply(t), [x])
    report = gradcheck(lambda t: BadSquare.apply(t), [x], raise_exception=False)
    assert report[0] > 0.1
    with pytest.raises(TypeError, match="use float64"):
        gradcheck(lambda t: t * 2, [tinymoe.tensor([1.0], requires_grad=True)])


@pytest.mark.gpu
def test_cpu_meets_gpu_is_a_clear_error():
    a = tinymoe.ones(2)
    b = tinymoe.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match=r"Add: inputs are on different devices \(cpu float32\(2,\), cuda float32\(2,\)\)"):
        a + b
    assert (a.to("cuda") + b).device == "cuda"


def test_diamond_with_paths_of_different_lengths():
    # s feeds the output directly and through a longer chain: its gradient must wait
    # for both consumers (a topological-order bug once handed it over too early).
    x = tinymoe.tensor(np.array([[0.3, -0.7], [1.1, 0.2]]), requires_grad=True)
    w = tinymoe.tensor(np.array([[0.5, -1.0], [2.0, 0.25]]), requires_grad=True)
    gradcheck(lambda a, b: (lambda s: s + ((s @ b) * 2).tanh() @ b)(a.tanh()), [x, w])
