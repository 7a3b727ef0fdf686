"""GPT (dense and MoE): shapes, cached generation == full recompute, training lowers the loss,
save -> load -> identical outputs, build_model errors."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.checkpoint import load_checkpoint, save_checkpoint
from tinymoe.models import GPT, build_model

TINY = dict(n_layer=2, d_model=16, n_head=2, d_ff=16, block_size=12)


@pytest.mark.parametrize("name,extra", [("gpt", {}), ("moe-gpt", dict(num_experts=4, moe_every=2)),
                                        ("moe-gpt", dict(num_experts=4, n_kv_head=1, num_shared_experts=1))])
def test_forward_shapes_and_stats(name, extra):
    model = build_model(name, **TINY, **extra)
    ids, targets = np.random.default_rng(0).integers(0, 256, (2, 2, 12))
    logits, loss = model(ids, targets)
    assert logits.shape == (2, 12, 256) and loss.shape == ()
    assert abs(loss.item() - np.log(256)) < 0.2                       # ~uniform at init
    moe_blocks = [i for i in range(2) if "moe" in model.blocks[i]._modules]
    assert list(model.stats()) == [f"layer{i}" for i in moe_blocks]
    if name == "moe-gpt" and extra.get("moe_every") == 2:
        assert moe_blocks == [1]
    assert model.wte.weight is not None and "lm_head" not in dict(model.named_parameters())


def test_cached_generation_logits_equal_full_recompute():
    model = build_model("moe-gpt", **TINY, num_experts=4, n_kv_head=1,
                        eval_capacity_factor=None).eval()  # (the GPT default)
    ids = np.random.default_rng(1).integers(0, 256, (2, 10))
    full, _ = model(ids)
    cache = tm.nn.attention.KVCache(2)
    with tm.no_grad():
        steps = [model(ids[:, :4], cache=cache)[0]] + \
                [model(ids[:, i:i + 1], cache=cache)[0] for i in range(4, 10)]
    np.testing.assert_allclose(np.concatenate([s.numpy() for s in steps], 1), full.numpy(), atol=1e-4)
    tm.manual_seed(5)
    a = model.generate(ids[:, :3], 8, temperature=0)
    b = model.generate(ids[:, :3], 8, temperature=0, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 11)
    long = model.generate(ids[:1, :3], 20, temperature=1.0, top_k=5)  # past block_size: cache rebuilt
    assert long.shape == (1, 23) and long.max() < 256


def test_training_steps_lower_the_loss():
    tm.manual_seed(0)
    model = build_model("moe-gpt", **TINY, num_experts=4, top_k=2)
    opt = tm.optim.AdamW(model.parameters(), lr=1e-2)
    ids = np.tile(np.arange(13) * 7 % 256, (4, 1))                   # a repeating pattern
    losses = []
    for _ in range(15):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        model.zero_grad()
        loss.backward()
        opt.step()
        losses.append(model.last_ce)
    assert losses[-1] < 0.5 * losses[0]


def test_gpt_gradcheck_tiny():
    tm.manual_seed(0)
    model = GPT(n_layer=1, d_model=4, n_head=2, d_ff=4, block_size=3, vocab_size=5,
                num_experts=2, top_k=1, router="switch", capacity_factor=None).to(dtype=np.float64)
    ids = np.array([[1, 4, 2]])
    p = dict(model.named_parameters())
    inputs = [p["wte.weight"], p["blocks.0.moe.experts.w1"], p["blocks.0.moe.gate.gate.weight"]]
    tm.gradcheck(lambda *a: model(ids, ids)[1], inputs, atol=1e-5, rtol=1e-4)


def test_save_load_identical_outputs(tmp_path):
    model = build_model("moe-gpt", **TINY, num_experts=4).eval()
    ids = np.random.default_rng(2).integers(0, 256, (1, 12))
    save_checkpoint(tmp_path / "m.safetensors", model)
    info = load_checkpoint(tmp_path / "m.safetensors")
    other = build_model("moe-gpt", **info["config"]).eval()
    other.load_state_dict(info["model_state"])
    np.testing.assert_array_equal(model(ids)[0].numpy(), other(ids)[0].numpy())
    bigger = build_model("moe-gpt", **{**TINY, "d_model": 32}, num_experts=4)
    with pytest.raises(RuntimeError, match=r"mis-shaped keys: wte.weight: checkpoint \(256, 16\) vs model \(256, 32\)"):
        load_checkpoint(tmp_path / "m.safetensors", bigger)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'bert'; valid models: gpt, moe-gpt"):
        build_model("bert")
    with pytest.raises(TypeError, match=r"build_model\('gpt'\): unknown config fields \['n_layers'\]"):
        build_model("gpt", n_layers=2)
    with pytest.raises(ValueError, match="sequence of 13 positions exceeds block_size=12"):
        build_model("gpt", **TINY)(np.zeros((1, 13), np.int64))


def test_fine_grained_experts_keep_active_parameters():
    """DeepSeekMoE fine-grained experts: 4x the experts, 1/4 the width, 4x the k -> same
    active parameters per token (the router grows with E)."""
    coarse = build_model("moe-gpt", **{**TINY, "d_ff": 32}, num_experts=4, top_k=1)
    fine = build_model("moe-gpt", **{**TINY, "d_ff": 8}, num_experts=16, top_k=4)
    expert_params = lambda m: sum(p.size for n, p in m.named_parameters() if ".experts." in n)
    assert expert_params(coarse) == expert_params(fine)
    active = lambda m: expert_params(m) * m.config.top_k // m.config.num_experts
    assert active(coarse) == active(fine) == 2 * (16 * 32 + 32 * 16)  # one 16-32-16 FFN per layer
    ids = np.zeros((1, 12), np.int64)
    fine(ids, ids)
    assert len(fine.stats()["layer0"]["tokens_per_expert"]) == 16


@pytest.mark.gpu
def test_raw_cupy_ids_equal_tensor_ids():
    """forward and generate take ids as a Tensor, a CuPy or a NumPy array, on a GPU model."""
    cp = tm.backend.cupy()
    tm.manual_seed(0)
    model = build_model("moe-gpt", vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32,
                        num_experts=4, block_size=8).to("cuda")
    ids = cp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)))
    raw, _ = model(ids[:, :-1], ids[:, 1:])
    wrapped, _ = model(tm.tensor(ids[:, :-1], device="cuda"), tm.tensor(ids[:, 1:], device="cuda"))
    np.testing.assert_array_equal(raw.numpy(), wrapped.numpy())
    host, _ = model(ids[:, :-1].get(), ids[:, 1:].get())      # NumPy ids move to the model's GPU
    np.testing.assert_array_equal(raw.numpy(), host.numpy())
    assert model.generate(ids[:, :4], 3, temperature=0.0).shape == (2, 7)
