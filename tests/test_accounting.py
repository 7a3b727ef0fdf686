"""The lectures' numbers, reproduced by tinymoe.accounting."""

import pytest

from tinymoe.accounting import (
    FP32_ADAM, MIXED_PRECISION_ADAM, MambaShape, TransformerShape, gpu_years, kv_cache_bytes,
    mamba_flops_per_token, mamba_params, mamba_state_bytes, model_state_bytes,
    optimal_params_for_compute, optimal_tokens, params_for_loss, switch_table, training_flops,
    transformer_activation_bytes, transformer_flops_per_token, transformer_params, waste_factor,
)
from tinymoe.accounting.arithmetic import mamba_block_params
from tinymoe.accounting.chinchilla import CHINCHILLA, gpu_seconds

GB = 1e9


# ------------------------------------------------------------------ Chinchilla
def test_lecture_training_run_20b_params_380b_tokens():
    flops = training_flops(20e9, 380e9)
    assert flops == pytest.approx(4.56e22, rel=1e-12)
    # 25% of 150 TFLOP/s: about 38 GPU-years
    years = gpu_years(flops, peak_flops=150e12, utilization=0.25)
    assert years == pytest.approx(38.5, abs=0.1)


def test_twenty_tokens_per_parameter():
    assert optimal_tokens(20e9) == pytest.approx(400e9)
    n = optimal_params_for_compute(training_flops(70e9, 1.4e12))   # Chinchilla itself
    assert n == pytest.approx(70e9, rel=1e-12)


def test_gpt3_waste_factor_about_2_5():
    loss = CHINCHILLA.loss(175e9, 300e9)
    assert loss == pytest.approx(2.002, abs=1e-3)
    n_opt = params_for_loss(loss)
    assert CHINCHILLA.loss(n_opt, 20 * n_opt) == pytest.approx(loss, abs=1e-9)
    assert 30e9 < n_opt < 34e9
    assert waste_factor(175e9, 300e9) == pytest.approx(2.57, abs=0.01)
    # a run already at 20 tokens per parameter wastes nothing
    assert waste_factor(1e9, 20e9) == pytest.approx(1.0, rel=1e-6)


def test_chinchilla_errors_name_the_argument():
    with pytest.raises(ValueError, match="gpu_seconds: utilization"):
        gpu_seconds(1e20, 1e15, 1.5)
    with pytest.raises(ValueError, match="gpu_seconds: peak_flops must be positive"):
        gpu_seconds(1e20, 0, 0.5)
    with pytest.raises(ValueError, match="params_for_loss: target_loss=1.5 is not above"):
        params_for_loss(1.5)
    with pytest.raises(ValueError, match="LossFit.loss: n_tokens must be positive"):
        CHINCHILLA.loss(1e9, -1)


# --------------------------------------------------------- parameter counts
GPT2_SMALL = TransformerShape(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                              bias=True, norm_params=2, max_seq_len=1024)


def test_gpt2_small_has_124m_parameters():
    # Hugging Face's gpt2 checkpoint: 124,439,808 parameters
    assert transformer_params(GPT2_SMALL).total == 124_439_808


def test_mamba_130m_parameter_count():
    s = MambaShape(vocab_size=50280, d_model=768, n_layers=24)
    assert s.rank == 48
    block = mamba_block_params(s)
    assert block["in_proj"] == 768 * 3072 and block["x_proj"] == 1536 * (48 + 32)
    assert mamba_params(s).total == 129_135_360      # state-spaces/mamba-130m


def test_tiny_transformer_hand_count():
    s = TransformerShape(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=8)
    # embedding 40 + norms 4*3 + attention 4*16 + ffn 2*32
    assert transformer_params(s).total == 40 + 12 + 64 + 64
    f = transformer_flops_per_token(s, seq_len=5)
    assert f.weights == 2 * (64 + 64 + 40)            # attention + ffn + LM head
    assert f.attention == 4 * 5 * 4                   # q.k and a.v over 5 keys, d=4
    assert f.training == 3 * f.forward


def test_gqa_and_mqa_shrink_kv_projections():
    mha = TransformerShape(10, 8, 1, n_heads=4, d_ff=8)
    gqa = TransformerShape(10, 8, 1, n_heads=4, d_ff=8, n_kv_heads=2)
    mqa = TransformerShape(10, 8, 1, n_heads=4, d_ff=8, n_kv_heads=1)
    p = [transformer_params(s).total for s in (mha, gqa, mqa)]
    assert p[0] - p[1] == 2 * 8 * 4 and p[0] - p[2] == 2 * 8 * 6


def test_moe_total_vs_active():
    dense = TransformerShape(100, 16, 4, 4, 64)
    moe = TransformerShape(100, 16, 4, 4, 64, num_experts=8, top_k=2, moe_every=2)
    pd, pm = transformer_params(dense), transformer_params(moe)
    ffn = 2 * 16 * 64
    router = 16 * 8
    assert pm.total - pd.total == 2 * (router + 7 * ffn)        # 2 MoE layers, 8 experts
    assert pm.active - pd.active == 2 * (router + 1 * ffn)      # top-2: one extra FFN
    fd, fm = transformer_flops_per_token(dense, 32), transformer_flops_per_token(moe, 32)
    assert fm.forward - fd.forward == 2 * (pm.active - pd.active)
    assert fm.router == 2 * 2 * router


def test_errors_name_shape():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        transformer_params(TransformerShape(5, 10, 1, 3, 8))


def test_mamba_flops_independent_of_length_and_about_2n():
    s = MambaShape(vocab_size=50280, d_model=768, n_layers=24)
    f = mamba_flops_per_token(s)
    assert f.attention == 0
    n = mamba_params(s).total
    assert 2 * n < f.forward < 2.2 * n          # the matmuls dominate; the scan adds a little


def test_switch_table_reproduces_the_paper():
    rows = {r["model"]: r for r in switch_table()}
    for name, row in rows.items():
        assert row["params"] == pytest.approx(row["paper_params"], rel=0.01), name
        assert row["flops_per_seq"] == pytest.approx(row["paper_flops_per_seq"], rel=0.02), name
    # the point of the table: 33x the parameters, the same FLOPs (router: +1%)
    for dense, sparse in (("T5-Base", "Switch-Base"), ("T5-Large", "Switch-Large")):
        assert rows[sparse]["params"] / rows[dense]["params"] > 30
        assert rows[sparse]["flops_per_seq"] / rows[dense]["flops_per_seq"] == pytest.approx(1, abs=0.01)
        assert rows[sparse]["active_params"] / rows[dense]["params"] == pytest.approx(1, abs=0.01)
    assert rows["T5-Base"]["params"] == 222_903_552        # Hugging Face t5-base


# ------------------------------------------------------------------- memory
def test_zero_figure_1():
    psi, nd = 7.5e9, 64
    expect = [120, 31.4, 16.6, 1.9]
    for stage, gb in enumerate(expect):
        got = model_state_bytes(psi, MIXED_PRECISION_ADAM, zero_stage=stage, data_parallel=nd) / GB
        assert got == pytest.approx(gb, abs=0.05), stage


def test_state_layouts_are_16_bytes_per_param():
    assert MIXED_PRECISION_ADAM.total == 16 and FP32_ADAM.total == 16
    assert model_state_bytes(1e9) == 16e9
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        model_state_bytes(1, zero_stage=4)
    with pytest.raises(ValueError, match="data_parallel must be >= 1"):
        model_state_bytes(1, data_parallel=0)


def test_activation_formula():
    # GPT-3 175B layer (h=12288, a=96) at s=2048, b=1: Korthikanti et al. Table 2 ratios
    s, b, h, a = 2048, 1, 12288, 96
    full = transformer_activation_bytes(s, b, h, a)
    assert full == s * b * h * (34 + 5 * a * s / h)
    sel = transformer_activation_bytes(s, b, h, a, recompute="selective")
    assert full / sel == pytest.approx(1 + 5 * a * s / (34 * h))
    assert transformer_activation_bytes(s, b, h, a, recompute="full") == 2 * s * b * h
    with pytest.raises(ValueError, match="recompute must be"):
        transformer_activation_bytes(s, b, h, a, recompute="some")


def test_kv_cache_and_mamba_state():
    # Llama-2-7B style: 32 layers, 32 heads of 128, fp16: 0.5 MiB per token
    assert kv_cache_bytes(32, 32, 128, seq_len=1) == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert kv_cache_bytes(32, 8, 128, 4096) * 4 == kv_cache_bytes(32, 32, 128, 4096)   # GQA-8
    m = mamba_state_bytes(n_layers=24, d_inner=1536, d_state=16, d_conv=4)
    assert m == 24 * 1536 * 19 * 2
