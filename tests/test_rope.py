"""RoPE and the Llama / Mixtral options of GPT (rope, rmsnorm, untied head), and MambaLM's
untied head: gradchecks, relative positions, cached decoding, defaults unchanged."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm
from strategies import leaf, shapes
from tinymoe.models import GPT, MambaConfig, MambaLM
from tinymoe.nn.attention import KVCache, MultiHeadAttention
from tinymoe.nn.rope import Rotary, apply_rope, rope_angles

LLAMA = dict(position="rope", norm="rmsnorm", tie_embeddings=False, activation="swiglu",
             n_kv_head=1)


@pytest.mark.parametrize("shape,start", [((2, 3, 4), 0), ((1, 2, 1, 5, 6), 7), ((1, 2), 100)])
def test_rope_gradcheck(shape, start):
    x = tm.tensor(np.random.default_rng(0).standard_normal(shape), requires_grad=True)
    tm.gradcheck(lambda x: apply_rope(x, start, base=10.0), [x])


@settings(max_examples=15, deadline=None)
@given(shapes(1, 3), st.sampled_from([2, 4, 6]), st.integers(0, 50))
def test_rope_gradcheck_on_drawn_shapes(lead, d_head, start):
    x = leaf(lead + (d_head,))                           # (..., L, d_head): L = lead[-1]
    tm.gradcheck(lambda x: apply_rope(x, start, base=100.0), [x])


def test_rope_is_a_rotation_that_sees_relative_positions():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 8))
    def dot(m, n):                                     # <R_m q, R_n k>
        qm = apply_rope(tm.tensor(np.tile(q, (m + 1, 1))), 0).numpy()[m]
        kn = apply_rope(tm.tensor(np.tile(k, (n + 1, 1))), 0).numpy()[n]
        return qm @ kn
    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-12)       # depends on m - n only
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)
    y = apply_rope(tm.tensor(rng.standard_normal((6, 8))), 3).numpy()
    x = apply_rope(tm.tensor(y), 0).numpy()
    assert np.linalg.norm(y, axis=-1) == pytest.approx(np.linalg.norm(x, axis=-1))   # norms kept
    cos, sin = rope_angles(0, 1, 8, 10000.0, "<f8", "cpu")
    np.testing.assert_array_equal(cos, 1)                             # m = 0: the identity
    np.testing.assert_array_equal(sin, 0)


def test_rope_errors_name_the_op():
    with pytest.raises(ValueError, match="rope: d_head=3 must be even"):
        apply_rope(tm.tensor(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="rope:"):
        Rotary.apply(tm.tensor(np.zeros((2, 4))), np.zeros((3, 4)), np.zeros((3, 4)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rope_in_16_bits(dtype):
    from tinymoe.dtypes import as_dtype, eps
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    y16 = apply_rope(tm.tensor(x.astype(as_dtype(dtype))), 3)       # angles in the input's format
    assert y16.dtype == as_dtype(dtype)
    want = apply_rope(tm.tensor(x), 3).numpy()
    np.testing.assert_allclose(y16.numpy().astype(np.float32), want, atol=8 * eps(as_dtype(dtype)) * 4)


def test_rope_attention_cached_equals_full():
    tm.manual_seed(0)
    mha = MultiHeadAttention(8, 4, 2, rope_base=100.0).to(dtype=np.float64)
    x = tm.tensor(np.random.default_rng(2).standard_normal((2, 6, 8)))
    full = mha(x).numpy()
    cache = KVCache(1)
    steps = [mha(x[:, :2], cache).numpy()] + [mha(x[:, i:i + 1], cache).numpy() for i in range(2, 6)]
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-13)
    assert "rope_base=100" in repr(mha)


def test_llama_style_gpt_gradcheck_including_the_untied_head():
    tm.manual_seed(0)
    model = GPT(n_layer=1, d_model=4, n_head=2, d_ff=4, block_size=3, vocab_size=5, **LLAMA,
                num_experts=2, top_k=2, capacity_factor=None).to(dtype=np.float64)
    p = dict(model.named_parameters())
    assert "wpe.weight" not in p and "blocks.0.ln1.bias" not in p
    ids = np.array([[1, 4, 2]])
    inputs = [p["wte.weight"], p["lm_head.weight"], p["ln_f.weight"], p["blocks.0.attn.qkv.weight"]]
    tm.gradcheck(lambda *a: model(ids, ids)[1], inputs, atol=1e-5, rtol=1e-4)


def test_llama_style_gpt_cached_generation_equals_full_recompute():
    model = GPT(n_layer=2, d_model=16, n_head=4, d_ff=16, block_size=12, **LLAMA,
                num_experts=4, top_k=2, capacity_factor=None).eval()
    ids = np.random.default_rng(3).integers(0, 256, (2, 10))
    full, _ = model(ids)
    cache = KVCache(2)
    with tm.no_grad():
        steps = [model(ids[:, :4], cache=cache)[0]] + \
                [model(ids[:, i:i + 1], cache=cache)[0] for i in range(4, 10)]
    np.testing.assert_allclose(np.concatenate([s.numpy() for s in steps], 1), full.numpy(), atol=1e-4)
    np.testing.assert_array_equal(model.generate(ids[:, :3], 6, temperature=0),
                                  model.generate(ids[:, :3], 6, temperature=0, use_cache=False))


def test_defaults_keep_the_parameter_names_and_init():
    tm.manual_seed(0)
    a = dict(GPT(n_layer=1, d_model=8, n_head=2, d_ff=8, block_size=4).named_parameters())
    assert "wpe.weight" in a and "lm_head.weight" not in a and "blocks.0.ln1.bias" not in a
    assert "lm_head.weight" not in dict(MambaLM(MambaConfig(d_model=8, n_layer=1)).named_parameters())
    with pytest.raises(ValueError, match="position must be"):
        GPT(position="alibi")
    with pytest.raises(ValueError, match="norm must be"):
        GPT(norm="batchnorm")


def test_mamba_untied_head_gradcheck_and_recurrence():
    tm.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=7, d_model=4, n_layer=1, d_state=2, d_conv=2,
                                tie_embeddings=False)).to(dtype=np.float64)
    ids = np.array([[1, 5, 2, 6]])
    head = dict(model.named_parameters())["lm_head.weight"]
    tm.gradcheck(lambda w: model(ids, ids)[1], [head])
    logits = model(ids)[0].numpy()
    state = model.allocate_state(1)
    steps = np.stack([model.step(ids[:, t], state).data for t in range(4)], axis=1)
    np.testing.assert_allclose(steps, logits, rtol=1e-9, atol=1e-11)
