"""HybridLM: Mamba + attention + MoE layers; recurrent generation matches the forward."""
import numpy as np
import pytest

import tinymoe
from tinymoe.models.hybrid import HybridConfig, HybridLM
from tinymoe.optim import AdamW


def tiny(**kw):
    cfg = dict(vocab_size=13, d_model=8, n_layer=4, attn_every=2, n_head=2, d_state=2,
               d_conv=3, d_ff=12, num_experts=3, moe_every=2, capacity_factor=None,
               eval_capacity_factor=None)
    return HybridLM(HybridConfig(**{**cfg, **kw}))


def test_layer_pattern():
    model = tiny()
    kinds = [("attn" if "attn" in b._modules else "mamba", "moe" if "moe" in b._modules else "mlp")
             for b in model.layers]
    assert kinds == [("mamba", "mlp"), ("attn", "moe"), ("mamba", "mlp"), ("attn", "moe")]
    names = {n for n, _ in model.named_parameters()}
    assert "layers.0.mamba.A_log" in names and "layers.1.attn.qkv.weight" in names
    assert any(n.startswith("layers.1.moe.gate.") for n in names)


def test_step_by_step_equals_forward():
    model = tiny().to(dtype=np.float64)
    model.eval()
    ids = np.random.default_rng(0).integers(0, 13, (2, 6))
    logits, _ = model(ids)
    state = model.allocate_state(2)
    steps = np.stack([model.step(ids[:, t], state).data for t in range(6)], axis=1)
    np.testing.assert_allclose(steps, logits.data, rtol=1e-9, atol=1e-11)


def test_training_lowers_loss_and_reports_router_stats():
    tinymoe.manual_seed(0)
    model = tiny()
    opt = AdamW(model.parameters(), lr=1e-2)
    ids = np.tile(np.arange(6), (4, 2))
    losses = []
    for _ in range(25):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    stats = model.stats()
    assert set(stats) == {"layer1", "layer3"}
    assert sum(stats["layer1"]["tokens_per_expert"]) == 4 * 11 * 2   # top-2, nothing dropped


def test_generate_and_bad_config():
    out = tiny().generate(np.array([[1, 2]]), 3, temperature=0)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="HybridLM: n_layer must be >= 1"):
        tiny(n_layer=0)
    with pytest.raises(ValueError, match=r"HybridLM: ids must be \(B, L\)"):
        tiny()(np.array([1, 2]))
