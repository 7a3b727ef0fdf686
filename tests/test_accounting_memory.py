"""The memory estimator (tinymoe/accounting/memory.py) against the memory tinymoe's own
training steps really use: the activations byte for byte, the step's peak within 10%."""
import tracemalloc

import numpy as np
import pytest

import tinymoe
from tinymoe import backend
from tinymoe.accounting.memory import (
    gpt_activation_bytes, gpt_num_parameters, gpt_training_step_bytes, rough_training_step_bytes,
)
from tinymoe.models import build_model
from tinymoe.optim import AdamW
from tinymoe.precision import get_precision
from tinymoe.profile.memory import memory_breakdown, track_memory
from tinymoe.step import make_step

SMALL = dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=256)
MOE = dict(SMALL, num_experts=4)
B, L = 8, 64


def build(device, precision, static_dispatch=None, **config):
    """A (MoE) GPT in a precision, with its AdamW (MasterWeights for 16 bits) and step."""
    tinymoe.manual_seed(0)
    model = build_model("moe-gpt" if config.get("num_experts") else "gpt", block_size=L,
                        **config).to(device)
    for moe in model.moe_layers():
        moe.static_dispatch = static_dispatch
    opt, prec = get_precision(precision).apply(model, AdamW(model.parameters(), lr=1e-3))
    return model, make_step(model, opt, grad_clip=1.0, precision=prec)


def batch(device):
    ids = np.random.default_rng(0).integers(0, 256, (B, L + 1))
    return backend.to_device(ids[:, :-1].copy(), device), backend.to_device(ids[:, 1:].copy(), device)


def array_bytes() -> int:
    """Bytes of NumPy array buffers alive now (tracemalloc's NumPy domain: no Python objects)."""
    domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    return sum(s.size for s in tracemalloc.take_snapshot().filter_traces([domain]).statistics("filename"))


def kept_by_forward(model, x, y, bytes_now):
    """Bytes a forward leaves for the backward, after a first step (the routers' statistics of
    the last forward, which a new forward replaces, dropped first)."""
    for moe in model.moe_layers():
        moe._stats = {}
    before = bytes_now()
    _, loss = model(x, y)
    kept = bytes_now() - before
    loss.backward()
    return kept


ACTIVATION_CASES = {
    "dense gelu fp32": (SMALL, "fp32", None),
    "dense swiglu gqa dropout fp32": (dict(SMALL, activation="swiglu", n_kv_head=2, dropout=0.1), "fp32", None),
    "dense llama bf16": (dict(SMALL, position="rope", norm="rmsnorm", tie_embeddings=False,
                              activation="swiglu", bias=True), "bf16", None),
    "dense recompute_attention fp16": (dict(SMALL, recompute_attention=True, bias=True), "fp16", None),
    "moe dropless fp32": (dict(MOE, capacity_factor=None), "fp32", None),
    "moe dropless bf16": (dict(MOE, capacity_factor=None), "bf16", None),
    "moe static swiglu shared fp16": (dict(MOE, activation="swiglu", num_shared_experts=1), "fp16", True),
    "moe static relu every 2nd, dropout bf16": (dict(MOE, activation="relu", moe_every=2, dropout=0.1,
                                                     top_k=1, z_loss_weight=0.0), "bf16", True),
    "moe static recompute_attention fp32": (dict(MOE, recompute_attention=True), "fp32", True),
}


@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_activation_count_equals_the_arrays_a_forward_keeps_cpu(case):
    config, precision, static = ACTIVATION_CASES[case]
    with track_memory("cpu"):
        model, step = build("cpu", precision, static, **config)
        x, y = batch("cpu")
        step(x, y)                                         # masters, moments, cached angles
        kept = kept_by_forward(model, x, y, array_bytes)
    assert gpt_activation_bytes(model.config, B, L, precision, "cpu", static)["total"] == kept


STEP_CASES = ["dense gelu fp32", "dense llama bf16", "moe dropless bf16", "moe static swiglu shared fp16",
              "moe static recompute_attention fp32"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_step_estimate_within_10_percent_of_the_measured_peak_cpu(case):
    config, precision, static = ACTIVATION_CASES[case]
    with track_memory("cpu") as mem:
        model, step = build("cpu", precision, static, **config)
        x, y = batch("cpu")
        step(x, y)
        step(x, y)
        mem.reset_peak()
        step(x, y)
        peak = mem.peak
    est = gpt_training_step_bytes(model, B, L, precision, "cpu", static)
    assert est["total"] == pytest.approx(peak, rel=0.10)
    assert rough_training_step_bytes(model, B, L, precision, "cpu") == \
        gpt_training_step_bytes(model, B, L, precision, "cpu")["total"]


def test_parameter_count_from_the_config():
    for config in (SMALL, dict(MOE, activation="swiglu", num_shared_experts=2, bias=True, moe_every=2),
                   dict(SMALL, bias=True, n_kv_head=1, position="rope", tie_embeddings=False)):
        model = build_model("moe-gpt" if config.get("num_experts") else "gpt", **config)
        assert gpt_num_parameters(model.config) == model.num_parameters()


def test_activation_estimate_scales_like_the_formula():
    cfg = build_model("gpt", vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32,
                      block_size=512).config
    a1 = gpt_activation_bytes(cfg, 1, 128)["attention_scores_per_layer"]
    a2 = gpt_activation_bytes(cfg, 1, 256)["attention_scores_per_layer"]
    assert a2 == 4 * a1 == 2 * 256 * 256 * 4       # B H L^2 floats: quadratic in L
    assert gpt_activation_bytes(cfg, 1, 256, "bf16")["attention_scores_per_layer"] == a2 // 2


def test_static_dispatch_pads_every_expert_to_its_capacity():
    cfg = build_model("moe-gpt", num_experts=4, top_k=2, capacity_factor=1.5, vocab_size=16,
                      d_model=8, n_head=2, d_ff=8).config
    static = gpt_activation_bytes(cfg, 4, 8, device="cuda")["experts"]       # R = E C = 4 * 24
    dynamic = gpt_activation_bytes(cfg, 4, 8, device="cuda", static_dispatch=False)["experts"]
    assert static == dynamic * 96 // 64                                      # vs R = T k = 64


def test_rough_estimate_covers_mamba_in_every_precision():
    model = build_model("mamba", vocab_size=32, d_model=16, n_layer=2)
    fp32, bf16 = (rough_training_step_bytes(model, 2, 16, p) for p in ("fp32", "bf16"))
    assert 0 < bf16 < fp32 + 4 * model.num_parameters()


def test_memory_breakdown_sums_to_the_estimate():
    model = build_model("moe-gpt", num_experts=4, vocab_size=32, d_model=16, n_head=2, d_ff=32,
                        block_size=16)
    rows = dict(memory_breakdown(model, 2, 16, "bf16", "cuda"))
    assert sum(v for k, v in rows.items() if k != "estimate") == rows["estimate"]


def test_track_memory_refuses_nesting():
    with track_memory("cpu"):
        with pytest.raises(RuntimeError, match="track_memory: tracemalloc is already tracing"):
            with track_memory("cpu"):
                pass


def gpu_pool_bytes():
    return backend.cupy().get_default_memory_pool().used_bytes()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dense gelu fp32", "dense llama bf16", "moe static swiglu shared fp16",
                                  "moe static recompute_attention fp32"])
def test_activation_count_equals_the_arrays_a_forward_keeps_gpu(case):
    config, precision, _ = ACTIVATION_CASES[case]
    model, step = build("cuda", precision, None, **config)       # static dispatch: the GPU's default
    x, y = batch("cuda")
    step(x, y)
    kept = kept_by_forward(model, x, y, gpu_pool_bytes)
    est = gpt_activation_bytes(model.config, B, L, precision, "cuda")["total"]
    assert est == pytest.approx(kept, rel=0.02)                  # the pool rounds to 512 bytes


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_step_estimate_within_10_percent_of_the_peak_in_use_gpu(precision):
    config = dict(MOE, d_model=128, d_ff=512)
    with track_memory("cuda") as mem:
        model, step = build("cuda", precision, None, **config)
        assert step.reason is None, step.reason                  # a CapturedStep
        mem.watch(step.pool)
        x, y = batch("cuda")
        step(x, y)                                               # the flat buffers are made
        mem.reset_peak()
        for _ in range(4):                                       # warm-up, capture, replays
            step(x, y)
        backend.synchronize("cuda")
    assert step.graph is not None
    est = gpt_training_step_bytes(model, B, L, precision, "cuda")["total"]
    assert est == pytest.approx(mem.peak, rel=0.10)
    assert mem.peak_held >= mem.peak
