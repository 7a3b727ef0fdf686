"""The memory estimator against measured peak memory of tinymoe's own training step."""
import numpy as np
import pytest

import tinymoe
from tinymoe.accounting.memory import tinymoe_gpt_activation_bytes, training_step_bytes
from tinymoe.models import build_model
from tinymoe.optim import AdamW
from tinymoe.profile.memory import track_memory


def measure_step(device, B, L, **config):
    """(estimate, measured peak, measured activations) of the second training step."""
    with track_memory(device) as mem:
        model = build_model("gpt", block_size=L, **config).to(device)
        opt = AdamW(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        V = model.config.vocab_size
        ids = tinymoe.tensor(rng.integers(0, V, (B, L)), device=device)
        targets = tinymoe.tensor(rng.integers(0, V, (B, L)), device=device)

        def step():
            opt.zero_grad()
            _, loss = model(ids, targets)
            loss.backward()
            opt.step()

        step()                                     # AdamW's m and v now exist
        mem.reset_peak()
        opt.zero_grad()
        before = mem.current
        _, loss = model(ids, targets)
        activations = mem.current - before
        loss.backward()
        opt.step()
        del loss
        peak = mem.peak
    P = model.num_parameters()
    act = tinymoe_gpt_activation_bytes(model.config, B, L, device=device)
    return training_step_bytes(P, act["total"]), peak, activations, act


CONFIGS = [
    dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=256),
    dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=1, d_model=64, d_ff=256,
         activation="swiglu", dropout=0.1),
    dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=256, recompute_attention=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_estimate_within_10_percent_of_measured_peak_cpu(config):
    est, peak, activations, act = measure_step("cpu", 8, 64, **config)
    assert act["total"] == pytest.approx(activations, rel=0.02)   # activations: within 2%
    assert est["total"] == pytest.approx(peak, rel=0.10)          # the whole step: within 10%
    assert est["activations"] > est["params"] + est["grads"] + est["optimizer"]


def test_activation_estimate_scales_like_the_formula():
    cfg = build_model("gpt", vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32,
                      block_size=512).config
    a1 = tinymoe_gpt_activation_bytes(cfg, 1, 128)["attention_scores_per_layer"]
    a2 = tinymoe_gpt_activation_bytes(cfg, 1, 256)["attention_scores_per_layer"]
    assert a2 == 4 * a1 == 2 * 256 * 256 * 4       # B H L^2 floats: quadratic in L
    with pytest.raises(ValueError, match="MoE layers are not modeled; got num_experts=4"):
        tinymoe_gpt_activation_bytes(build_model("moe-gpt", num_experts=4, vocab_size=16,
                                                 d_model=8, n_head=2, d_ff=8).config, 1, 4)


def test_track_memory_refuses_nesting():
    with track_memory("cpu"):
        with pytest.raises(RuntimeError, match="track_memory: tracemalloc is already tracing"):
            with track_memory("cpu"):
                pass


@pytest.mark.gpu
def test_estimate_within_10_percent_of_measured_peak_gpu():
    est, peak, activations, act = measure_step("cuda", 8, 64, **CONFIGS[0])
    assert act["total"] == pytest.approx(activations, rel=0.05)
    assert est["total"] == pytest.approx(peak, rel=0.10)
