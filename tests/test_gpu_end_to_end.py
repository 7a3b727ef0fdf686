"""CuPy end to end: every autograd op, and one training step of every model, on the GPU
equal to the same on the CPU. Float64 for the ops (so any difference is a bug, not
rounding); the models in their float32 default, compared at float32 tolerance.
Run on the device machine; skipped without a GPU.
"""
import inspect

import numpy as np
import pytest

import tinymoe
import tinymoe.nn.functional as F
from tinymoe.autograd import Function, ops

pytestmark = pytest.mark.gpu
R = np.random.default_rng(0)


def pos(*s):
    return R.uniform(0.5, 2.0, s)


def sym(*s):
    return R.uniform(-2.0, 2.0, s)


def _scan(u, delta, A, B, C, D):
    from tinymoe.nn.ssm.selective_scan import selective_scan
    return selective_scan(u, delta, A, B, C, D=D, delta_softplus=True)


def _moe(x, w, W):
    """permute -> grouped linear -> combine, through the device's default dispatch kernels."""
    from tinymoe.kernels.dispatch import make_dispatch_plan
    from tinymoe.nn.moe.dispatch import combine, permute
    from tinymoe.nn.moe.experts import grouped_linear
    xp = tinymoe.backend.array_module(x.data)
    plan = make_dispatch_plan(xp.asarray([[0, 2], [2, 1], [0, 1], [2, 0], [1, 2]]), 3, capacity=3)
    return combine(grouped_linear(permute(x, plan), W, plan.offsets), w, plan)


def _attention(q, k, v):
    from tinymoe.nn.attention import CausalAttention
    return CausalAttention.apply(q, k, v)


def _normal_cdf(x):
    from tinymoe.nn.moe.losses import normal_cdf
    return normal_cdf(x)


def _moe_losses(z):
    from tinymoe.nn.moe.losses import load_balancing_loss, z_loss
    index = ix([[0, 2], [2, -1], [1, 0], [2, 2]], z)                       # one empty slot
    return load_balancing_loss(F.softmax(z, axis=-1), index, 3) + z_loss(z)


def ix(values, like):
    """An integer index array on the device of tensor `like`."""
    return tinymoe.backend.to_device(np.array(values), like.device)


IDX = [[0, 2, 1], [1, 1, 0]]
# name -> (function of Tensors, input arrays, the Function classes it exercises)
CASES = {
    "arithmetic": (lambda a, b: (a + b) * a - b / (a * a + 1.0) - (-a) ** 3,
                   (sym(2, 3), sym(3)), {"Add", "Sub", "Mul", "Div", "Neg", "Pow"}),
    "unary": (lambda a: a.exp() + a.log() + a.sqrt() + a.abs() + a.tanh() + a.sigmoid() + a.relu(),
              (pos(3, 4),), {"Exp", "Log", "Sqrt", "Abs", "Tanh", "Sigmoid", "Relu"}),
    "activations": (lambda a: F.gelu(a) + F.gelu(a, approximate="tanh") + F.silu(a) + F.softplus(a),
                    (sym(3, 4),), {"Gelu", "Silu", "Softplus"}),
    "reductions": (lambda a: a.sum(axis=0) + a.mean(axis=0) + a.var(axis=0) + a.max(axis=0)
                   + a.min(axis=0) + a.logsumexp(axis=0) + a.cumsum(axis=1)[-1],
                   (sym(4, 3),), {"Sum", "Mean", "Var", "Max", "Min", "LogSumExp", "Cumsum"}),
    "shapes": (lambda a, b: tinymoe.concat([a.reshape(3, 2).transpose(), b], axis=1).sum()
               + tinymoe.stack([a, a]).sum() + F.pad(a, ((1, 0), (0, 2))).sum()
               + F.split(a, 2, axis=0)[1].sum() + b.broadcast_to((4, 2, 2)).sum(),
               (sym(2, 3), sym(2, 2)),
               {"Reshape", "Transpose", "Concat", "Stack", "Pad", "Split", "BroadcastTo"}),
    "indexing": (lambda a, b: a[1:, ::2].sum() + a[[0, 1, 0]].sum()
                 + F.gather(a, 1, ix(IDX, a)).sum() + F.scatter_add(a, 1, ix(IDX, a), b).sum()
                 + F.index_add(a, 1, ix([1, 0, 1], a), b).sum()
                 + tinymoe.where(a.data > 0, a, a * 2).sum() + F.topk(a, 2)[0].sum()
                 + (a @ a.transpose()).sum(),
                 (sym(2, 4), sym(2, 3)),
                 {"GetItem", "Gather", "ScatterAdd", "IndexAdd", "Where", "TopK", "MatMul"}),
    "nn_functional": (lambda x, w, b, e: F.layer_norm(F.linear(x, w, b), e, b)
                      + F.rms_norm(x @ w.transpose(), e) + F.softmax(x @ w.transpose(), axis=-1)
                      + F.log_softmax(x @ w.transpose(), axis=0)
                      + F.dropout(x @ w.transpose(), 0.5, training=False),
                      (sym(4, 3), sym(5, 3), sym(5), pos(5)),
                      {"LinearFunction", "LayerNorm", "RMSNorm", "Softmax", "LogSoftmax", "Dropout"}),
    "cross_entropy": (lambda z: F.cross_entropy(z, ix([1, 0, 3, -100], z))
                      + F.cross_entropy(z, ix([2, 2, 0, 1], z), reduction="sum"),
                      (sym(4, 5),), {"CrossEntropy"}),
    "embedding_conv": (lambda w, x, k: F.embedding(ix([[1, 0, 2]], w), w).sum()
                       + F.conv1d_causal(x, k, w[0, :2]).sum(axis=1),
                       (sym(3, 4), sym(2, 2, 6), sym(2, 1, 3)), {"Embedding", "Conv1dCausal"}),
    "device_and_cast": (lambda a: (a.to("cuda").astype(np.float32).astype(np.float64)
                                   * a.to("cuda")).to("cpu"),
                        (sym(3, 2),), {"ToDevice", "Cast"}),
    "selective_scan": (_scan, (sym(2, 3, 9), sym(2, 3, 9), -pos(3, 4), sym(2, 4, 9),
                               sym(2, 4, 9), sym(3)), {"SelectiveScan"}),
    "moe_dispatch": (_moe, (sym(5, 4), pos(5, 2), sym(3, 4, 6)),
                     {"Permute", "Combine", "GroupedLinear"}),
    "attention": (_attention, (sym(1, 2, 2, 5, 4), sym(1, 2, 1, 5, 4), sym(1, 2, 1, 5, 4)),
                  {"CausalAttention"}),
    "normal_cdf": (_normal_cdf, (sym(7),), {"NormalCDF"}),
    "moe_losses": (_moe_losses, (sym(4, 3),), {"LoadBalancingLoss", "ZLoss"}),
}


def run(fn, arrays, device):
    """Forward, then backward of sum(out * g) for a fixed g; returns out and all grads."""
    leaves = [tinymoe.tensor(a, requires_grad=True, device=device) for a in arrays]
    out = fn(*leaves)
    g = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(tinymoe.backend.to_device(g, out.device))
    return [out.numpy()] + [t.grad if t.grad is None else tinymoe.backend.to_numpy(t.grad)
                            for t in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_forward_backward_gpu_equals_cpu(name):
    fn, arrays, _ = CASES[name]
    cpu = run(fn, arrays, "cpu")
    gpu = run(fn, arrays, "cuda")
    for i, (c, g) in enumerate(zip(cpu, gpu)):
        assert (c is None) == (g is None), f"{name}: grad {i} exists on one device only"
        if c is not None:
            np.testing.assert_allclose(g, c, rtol=1e-9, atol=1e-11, err_msg=f"{name} [{i}]")


def test_every_function_is_covered_on_the_gpu():
    import tinymoe.nn.attention
    import tinymoe.nn.moe.dispatch
    import tinymoe.nn.moe.experts
    import tinymoe.nn.moe.losses
    import tinymoe.nn.ssm.selective_scan as ssm_scan
    covered = set().union(*(names for _, _, names in CASES.values()))
    modules = (ops, tinymoe.nn.attention, tinymoe.nn.moe.dispatch, tinymoe.nn.moe.experts,
               tinymoe.nn.moe.losses, ssm_scan)
    functions = {n for m in modules for n, v in vars(m).items()
                 if inspect.isclass(v) and issubclass(v, Function) and v is not Function}
    assert functions <= covered, f"Functions with no GPU case here: {sorted(functions - covered)}"


# ------------------------------------------------------------------------ models
def _models():
    from tinymoe.models import MODELS, build_model
    small = dict(vocab_size=32, d_model=32, n_layer=2)
    out = {name: (lambda name=name: build_model(name, **small, n_head=2, block_size=16, d_ff=64))
           for name in MODELS if name in ("gpt", "moe-gpt")}
    try:
        from tinymoe.models.mamba import MambaLM
        out["mamba"] = lambda: MambaLM(**small)
    except ImportError:
        pass
    for name in MODELS:
        if name not in out and name != "hybrid":
            out[name] = lambda name=name: build_model(name, **small)
    return out


@pytest.mark.parametrize("name", sorted(_models()))
def test_model_training_steps_gpu_equal_cpu(name):
    """Same init, same batch: three AdamW steps give the same losses on both devices."""
    tinymoe.manual_seed(0)
    model_cpu = _models()[name]()
    model_gpu = _models()[name]()
    model_gpu.load_state_dict(model_cpu.state_dict())
    model_gpu.to("cuda")
    ids = np.random.default_rng(2).integers(0, 32, (2, 16))
    losses = {}
    for dev, model in (("cpu", model_cpu), ("cuda", model_gpu)):
        opt = tinymoe.optim.AdamW(model.parameters(), lr=1e-2)
        x = tinymoe.tensor(ids[:, :-1], device=dev)
        y = tinymoe.tensor(ids[:, 1:], device=dev)
        losses[dev] = []
        for _ in range(3):
            opt.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            losses[dev].append(loss.item())
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-4)
    assert losses["cuda"][-1] < losses["cuda"][0]
    # AdamW's first steps move every entry by about lr * sign(g): an entry whose gradient is
    # at float32 rounding level (summation order differs between devices, e.g. the experts'
    # batched matmul) can step differently. So: nearly all entries equal at float32
    # tolerance, and none further apart than the 3 steps of size lr could take them.
    for (n, p_cpu), (_, p_gpu) in zip(model_cpu.named_parameters(), model_gpu.named_parameters()):
        gpu = tinymoe.backend.to_numpy(p_gpu.data)
        off = ~np.isclose(gpu, p_cpu.data, rtol=2e-3, atol=2e-4)
        assert off.mean() <= 1e-3, f"{name}: {n}: {off.sum()} of {off.size} entries differ"
        assert np.abs(gpu - p_cpu.data).max() <= 3 * 2 * 1e-2, f"{name}: {n}"
