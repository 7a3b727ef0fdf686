"""Activation recomputation: same values and gradients, less memory kept for the backward."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe import nn
from tinymoe.autograd import gradcheck, no_grad
from tinymoe.models import build_model
from tinymoe.nn import functional as F
from tinymoe.nn import recompute
from tinymoe.profile.memory import track_memory


class Block(nn.Module):
    def __init__(self, d, dropout=0.0):
        super().__init__()
        self.norm, self.fc1, self.fc2, self.dropout = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(3 * d, d), dropout

    def forward(self, x):
        h = F.dropout(F.gelu(self.fc1(self.norm(x))), self.dropout, self.training)
        return x + self.fc2(h)


def test_gradcheck_through_a_recomputed_block_inputs_and_parameters():
    tm.manual_seed(0)
    block = Block(4)
    for p in block.parameters():
        p.data = p.data.astype(np.float64)
    x = tm.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    assert gradcheck(lambda x: recompute(block, x), [x])
    block.zero_grad()
    x.grad = None
    recompute(block, x).sum().backward()
    recomputed = [p.grad.copy() for p in block.parameters()] + [x.grad.copy()]
    block.zero_grad()
    x.grad = None
    block(x).sum().backward()                           # the same graph, stored
    stored = [p.grad for p in block.parameters()] + [x.grad]
    for g_recomputed, g_stored in zip(recomputed, stored):
        np.testing.assert_allclose(g_recomputed, g_stored, rtol=1e-12, atol=1e-12)


def test_dropout_masks_replay_in_the_recomputation():
    tm.manual_seed(3)
    block = Block(8, dropout=0.5)
    x = tm.randn(5, 8, requires_grad=True)
    tm.manual_seed(7)
    y = recompute(block, x)
    (y * y).sum().backward()
    gx_recomputed, gw_recomputed = x.grad.copy(), block.fc1.weight.grad.copy()
    x.grad = None
    block.zero_grad()
    tm.manual_seed(7)
    y_stored = block(x)
    (y_stored * y_stored).sum().backward()
    np.testing.assert_array_equal(y.data, y_stored.data)
    np.testing.assert_allclose(gx_recomputed, x.grad, rtol=1e-6)
    np.testing.assert_allclose(gw_recomputed, block.fc1.weight.grad, rtol=1e-6)


def test_plain_call_without_a_graph_and_error_for_a_non_tensor_result():
    block = Block(4)
    x = tm.randn(2, 4, requires_grad=True)
    with no_grad():
        assert recompute(block, x)._ctx is None
    assert recompute(block, tm.randn(2, 4)).requires_grad   # no input needs grad: recorded as usual
    with pytest.raises(TypeError, match="recompute: the function must return one Tensor, got tuple"):
        recompute(lambda x: (x, x), x)


def _kept_and_grads(name, ids, **config):
    """One float64 forward + backward of a fresh model (same seed, same init): the loss,
    the parameters' gradients, and the bytes the graph holds between the two passes."""
    tm.manual_seed(0)
    model = build_model(name, **config)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    with no_grad():
        model(ids[:, :-1])                               # warm-up: caches (the causal mask) filled
    with track_memory("cpu") as mem:
        tm.manual_seed(5)                                # the same dropout masks each time
        _, loss = model(ids[:, :-1], ids[:, 1:])
        kept = mem.current
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, kept


def _same_training(stored, recomputed):
    """Equal losses and gradients; returns the bytes kept by each."""
    (loss0, grads0, kept0), (loss1, grads1, kept1) = stored, recomputed
    assert loss1 == loss0
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-10, atol=1e-12, err_msg=name)
    return kept0, kept1


GPT = dict(vocab_size=64, n_layer=3, n_head=2, d_model=32, block_size=32)


def test_gpt_with_recompute_equals_gpt_without_and_keeps_less():
    ids = np.random.default_rng(1).integers(0, 64, (4, 33))
    kept0, kept1 = _same_training(*(_kept_and_grads("gpt", ids, d_ff=128, dropout=0.1, recompute=flag, **GPT)
                                     for flag in (False, True)))
    assert kept1 < kept0 / 3, (kept1, kept0)            # 3 blocks: only their inputs stay


def test_mamba_lm_with_recompute_equals_mamba_lm_without_and_keeps_less():
    ids = np.random.default_rng(2).integers(0, 32, (2, 17))
    config = dict(vocab_size=32, d_model=16, n_layer=2, d_state=4)
    kept0, kept1 = _same_training(*(_kept_and_grads("mamba", ids, recompute=flag, **config)
                                     for flag in (False, True)))
    assert kept1 < kept0 / 2, (kept1, kept0)


def test_gpt_recompute_attention_keeps_no_attention_probabilities():
    B, L, H, layers = 4, GPT["block_size"], GPT["n_head"], GPT["n_layer"]
    ids = np.random.default_rng(1).integers(0, 64, (B, L + 1))
    kept0, kept1 = _same_training(*(_kept_and_grads("gpt", ids, d_ff=64, recompute_attention=flag, **GPT)
                                     for flag in (False, True)))
    saved = layers * (B * H * L * L - B * H * L) * 8                     # P out, lse in (float64)
    assert saved <= kept0 - kept1 <= 1.1 * saved      # the P arrays, give or take small objects


def test_recompute_refuses_moe_blocks():
    with pytest.raises(ValueError, match="recompute=True needs a dense model"):
        build_model("moe-gpt", num_experts=4, recompute=True)
