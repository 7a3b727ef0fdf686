"""Causal attention (MHA / GQA / MQA): gradcheck, the kernel reference, causality, KV cache."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.kernels.attention import attention_reference
from tinymoe.nn.attention import CausalAttention, KVCache, MultiHeadAttention


@pytest.mark.parametrize("keep_probs", [True, False], ids=["P kept", "P recomputed"])
@pytest.mark.parametrize("Hkv,G,Lq,Lk", [(2, 1, 3, 3), (1, 3, 4, 4), (2, 2, 2, 5), (1, 1, 1, 1)])
def test_causal_attention_gradcheck_and_reference(Hkv, G, Lq, Lk, keep_probs):
    rng = np.random.default_rng(0)
    q = tm.tensor(rng.standard_normal((2, Hkv, G, Lq, 3)), requires_grad=True)
    k = tm.tensor(rng.standard_normal((2, Hkv, 1, Lk, 3)), requires_grad=True)
    v = tm.tensor(rng.standard_normal((2, Hkv, 1, Lk, 3)), requires_grad=True)
    out = CausalAttention.apply(q, k, v, keep_probs=keep_probs).numpy()
    shape = q.shape[:-2] + (Lk, 3)
    ref = attention_reference(q.data, np.broadcast_to(k.data, shape), np.broadcast_to(v.data, shape))
    np.testing.assert_allclose(out, ref, atol=1e-12)
    tm.gradcheck(lambda q, k, v: CausalAttention.apply(q, k, v, keep_probs=keep_probs), [q, k, v])


def test_recomputed_probabilities_give_the_stored_gradients_and_keep_no_l_squared_array():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 2, 1, 6, 4)) for _ in range(3))
    g = rng.standard_normal((2, 2, 1, 6, 4))
    grads, saved = [], []
    for keep_probs in (True, False):
        ts = [tm.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = CausalAttention.apply(*ts, keep_probs=keep_probs)
        saved.append(max(a.shape[-1] for a in out._ctx.saved))           # widest saved array
        out.backward(g)
        grads.append([t.grad for t in ts])
    for stored, recomputed in zip(*grads):
        np.testing.assert_allclose(recomputed, stored, rtol=1e-12, atol=1e-14)
    assert saved == [6, 4]                     # P (..., Lq, Lk) kept; then nothing wider than d


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_mha_gqa_mqa_causal_and_cached(H, Hkv):
    attn = MultiHeadAttention(8, H, Hkv)
    assert attn.qkv.weight.shape == ((H + 2 * Hkv) * 2, 8)            # fewer K/V heads, fewer weights
    x = tm.randn(2, 6, 8)
    y = attn(x).numpy()
    x2 = x.numpy().copy()
    x2[:, 4:] += 1.0                                                   # change the future ...
    np.testing.assert_allclose(attn(tm.tensor(x2)).numpy()[:, :4], y[:, :4], atol=1e-6)  # ... past unchanged
    cache = KVCache(1)
    with tm.no_grad():
        parts = [attn(x[:, :2], cache)] + [attn(x[:, i:i + 1], cache) for i in range(2, 6)]
    assert cache.length == 6
    np.testing.assert_allclose(np.concatenate([p.numpy() for p in parts], 1), y, atol=1e-5)


def test_mha_gradcheck_module():
    tm.manual_seed(0)
    attn = MultiHeadAttention(4, 2, 1).to(dtype=np.float64)
    x = tm.tensor(np.random.default_rng(1).standard_normal((1, 3, 4)), requires_grad=True)
    tm.gradcheck(lambda x, w, p: attn(x), [x, attn.qkv.weight, attn.proj.weight])


def test_attention_errors():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_kv_heads=3"):
        MultiHeadAttention(8, 4, 3)
