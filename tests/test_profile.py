"""The profiler's FLOP counts against hand counts, its bytes, modules and tables."""
import numpy as np
import pytest

import tinymoe
from tinymoe import nn
from tinymoe.autograd import Function
from tinymoe.nn import functional as F
from tinymoe.profile import op_bytes, op_flops, profile, register_flops


def records(prof, op, phase):
    return [r for r in prof.records if r.op == op and r.phase == phase]


def test_matmul_flops_forward_and_backward_hand_count():
    a = tinymoe.randn(3, 4, 5, requires_grad=True)      # (b, m, k)
    b = tinymoe.randn(5, 7, requires_grad=True)         # (k, n), broadcast over b
    with profile() as prof:
        (a @ b).sum().backward()
    (fwd,) = records(prof, "MatMul", "forward")
    (bwd,) = records(prof, "MatMul", "backward")
    assert fwd.flops == 2 * 3 * 4 * 5 * 7               # 840
    assert bwd.flops == 2 * (2 * 3 * 4 * 5 * 7)          # dA and dB, each as many
    assert fwd.bytes_read == (3 * 4 * 5 + 5 * 7) * 4 and fwd.bytes_written == 3 * 4 * 7 * 4


def test_matmul_backward_one_gradient():
    a = tinymoe.randn(4, 6)                              # constant
    b = tinymoe.randn(6, 2, requires_grad=True)
    with profile() as prof:
        (a @ b).sum().backward()
    (bwd,) = records(prof, "MatMul", "backward")
    assert bwd.flops == 2 * 4 * 6 * 2


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_hand_count(bias):
    layer = nn.Linear(6, 3, bias=bias)
    x = tinymoe.randn(2, 5, 6, requires_grad=True)       # M = 10 rows
    with profile(layer) as prof:
        layer(x).sum().backward()
    (fwd,) = records(prof, "LinearFunction", "forward")
    (bwd,) = records(prof, "LinearFunction", "backward")
    M = 10
    assert fwd.flops == 2 * M * 6 * 3 + (M * 3 if bias else 0)
    assert bwd.flops == 2 * (2 * M * 6 * 3) + (M * 3 if bias else 0)   # dx, dW (+ db)
    assert fwd.module == bwd.module == "Linear"


def test_elementwise_counts_with_broadcasting():
    x = tinymoe.randn(4, 5, requires_grad=True)
    y = tinymoe.randn(5, requires_grad=True)
    with profile() as prof:
        ((x * y + x) / 2.0).sum().backward()
    assert records(prof, "Mul", "forward")[0].flops == 20
    assert records(prof, "Add", "forward")[0].flops == 20
    assert records(prof, "Div", "forward")[0].flops == 20
    assert records(prof, "Sum", "forward")[0].flops == 19          # 20 numbers, 19 adds
    # Mul backward: g*y (20) for x, g*x (20) + reduce to (5,) (15 adds) for y
    assert records(prof, "Mul", "backward")[0].flops == 20 + 20 + 15


def test_reshape_and_transpose_move_nothing():
    x = tinymoe.randn(3, 4, requires_grad=True)
    with profile() as prof:
        x.reshape(4, 3).transpose(1, 0).sum().backward()
    for op in ("Reshape", "Transpose"):
        (r,) = records(prof, op, "forward")
        assert r.flops == 0 and r.bytes == 0


def test_op_bytes_backward_reads_grads_and_saved():
    g = np.zeros((4, 3), np.float32)
    dx, dw = np.zeros((4, 5), np.float32), np.zeros((3, 5), np.float32)
    read, written = op_bytes("LinearFunction", "backward", (g,), (dx, dw))
    assert written == dx.nbytes + dw.nbytes and read == g.nbytes + written


class Mystery(Function):
    """y = 2x: an op the profiler has no rule for."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_unknown_op_is_marked_and_rules_can_be_registered():
    x = tinymoe.randn(3, requires_grad=True)
    with profile() as prof:
        Mystery.apply(x).sum().backward()
    assert records(prof, "Mystery", "forward")[0].flops is None
    mystery_row = [line for line in prof.table().splitlines() if line.startswith("Mystery")]
    assert "?" in mystery_row[0]
    register_flops("Mystery", lambda phase, ins, outs, params: outs[0].size if phase == "forward" else ins[0].size)
    try:
        assert op_flops("Mystery", "forward", (np.zeros(3),), (np.zeros(3),), {}) == 3
    finally:
        from tinymoe.profile.flops import RULES
        RULES.pop("Mystery")
    with pytest.raises(TypeError, match="register_flops: rule for 'X' must be callable"):
        register_flops("X", 3)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_module_attribution_forward_and_backward():
    model = Stack(d=6, n=3)
    original_call = nn.Module.__call__
    x = tinymoe.randn(4, 6, requires_grad=True)
    with profile(model) as prof:
        model(x).sum().backward()
    fwd = [r.module for r in records(prof, "LinearFunction", "forward")]
    bwd = [r.module for r in records(prof, "LinearFunction", "backward")]
    assert fwd == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]
    assert bwd == ["head", "blocks.2.fc", "blocks.1.fc", "blocks.0.fc"]
    assert [r.module for r in records(prof, "LayerNorm", "backward")] == [
        "blocks.2.norm", "blocks.1.norm", "blocks.0.norm"]
    per_block = {row["name"]: row for row in prof.summary(by="module", depth=2)}
    assert per_block["blocks.0"]["flops"] == per_block["blocks.2"]["flops"] > 0
    n = 4 * 6                                    # elements of the (4, 6) activation
    expect = (
        (2 * n * 6 + n) + (2 * n * 6 + 2 * n * 6 + n)   # fc: forward; dx, dW, db
        + 8 * n + (8 * n + 2 * n + n)                   # layer norm (with bias); dx, dw, db
        + 5 * n + 10 * n                                # gelu (erf form)
        + n + 0                                         # residual add
    )
    assert per_block["blocks.1"]["flops"] == expect == 1752
    # Module.__call__ is restored
    assert nn.Module.__call__ is original_call


def test_backward_follows_its_forward_node_not_its_shape():
    """Two branches whose linear layers make outputs of one shape from inputs of different
    widths: each backward is charged to the module whose forward made the node, whatever
    order backward visits the branches in."""
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.narrow, self.wide = nn.Linear(3, 5, bias=False), nn.Linear(40, 5, bias=False)

        def forward(self, a, b):
            return self.narrow(a) * 2.0 + self.wide(b)

    model = TwoBranches()
    a, b = tinymoe.randn(4, 3, requires_grad=True), tinymoe.randn(4, 40, requires_grad=True)
    with profile(model) as prof:
        model(a, b).sum().backward()
    rows = {row["name"]: row for row in prof.summary(by="module", phase="backward")}
    assert rows["narrow"]["flops"] == 2 * (2 * 4 * 3 * 5)     # dx and dW of a (4,3)@(3,5)
    assert rows["wide"]["flops"] == 2 * (2 * 4 * 40 * 5)      # dx and dW of a (4,40)@(40,5)


def test_recomputed_attention_backward_counts_the_extra_scores():
    """keep_probs=False rebuilds P in the backward: Q K^T again (2 d per score) and 3 more
    per score (scale, - lse, exp); the profiler reads the forward's params for the backward."""
    from tinymoe.nn.attention import CausalAttention
    rng = np.random.default_rng(0)
    flops = {}
    for keep in (True, False):
        q, k, v = (tinymoe.tensor(rng.standard_normal((1, 2, 1, 5, 4)), requires_grad=True) for _ in range(3))
        with profile() as prof:
            CausalAttention.apply(q, k, v, keep_probs=keep).sum().backward()
        flops[keep] = prof.flops("backward") - sum(r.flops or 0 for r in prof.records
                                                    if r.phase == "backward" and r.op != "CausalAttention")
    scores = 2 * 5 * 5                                     # (heads) x Lq x Lk
    assert flops[False] - flops[True] == scores * (2 * 4 + 3)


def test_summary_rejects_unknown_grouping():
    with profile() as prof:
        pass
    with pytest.raises(ValueError, match="Profiler.summary: by must be"):
        prof.summary(by="layer")


def test_mlp_flops_match_the_accounting_rule():
    # forward of a bias-free 2-layer MLP on T tokens: 2 * params * T (the 2N rule)
    d, h, T = 8, 32, 10
    mlp = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False))
    with profile(mlp) as prof, tinymoe.no_grad():
        mlp(tinymoe.randn(T, d))
    assert prof.flops("forward") == 2 * mlp.num_parameters() * T


@pytest.mark.gpu
def test_gpu_times_come_from_cuda_events():
    layer = nn.Linear(64, 64).to("cuda")
    x = tinymoe.randn(128, 64, device="cuda", requires_grad=True)
    with profile(layer) as prof:
        layer(x).sum().backward()
    assert all(r.seconds >= 0 for r in prof.records)
    assert records(prof, "LinearFunction", "forward")[0].flops == 2 * 128 * 64 * 64 + 128 * 64


def test_model_level_op_rules_hand_counts():
    z = np.zeros
    # causal attention: B=2, Hkv=1, G=3 query heads, Lq=Lk=5, d=4: 2 matmuls + 6 per score
    q, k, out = z((2, 1, 3, 5, 4)), z((2, 1, 1, 5, 4)), z((2, 1, 3, 5, 4))
    scores = 2 * 3 * 5 * 5
    assert op_flops("CausalAttention", "forward", (q, k, k), (out,), {}) == scores * (2 * 4 + 2 * 4 + 6)
    assert op_flops("CausalAttention", "backward", (out,), (q, k, k), {}) == scores * (4 * 4 * 2 + 5)
    # grouped linear: R=7 rows, E=3 experts of (4 -> 6)
    xs, W, ys = z((7, 4)), z((3, 4, 6)), z((7, 6))
    assert op_flops("GroupedLinear", "forward", (xs, W, None), (ys,), {}) == 2 * 7 * 4 * 6
    assert op_flops("GroupedLinear", "backward", (ys,), (xs, W), {}) == 2 * (2 * 7 * 4 * 6)
    # selective scan: batch 2, 3 channels, L=5, N=4 states
    u, A = z((2, 3, 5)), z((3, 4))
    assert op_flops("SelectiveScan", "forward", (u, u, A, z((2, 4, 5)), z((2, 4, 5))), (u,), {}) \
        == 2 * 3 * 5 * (7 * 4 + 8)
