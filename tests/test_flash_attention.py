"""Tiled attention with the online softmax equals the naive one, in far less memory."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymoe.kernels.attention import attention_reference, attention_tiled


def softmax_attention_by_loops(q, k, v, causal):
    """The definition, one query at a time: an independent check of the reference."""
    Lq, Lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(q.shape[:-2]):
        for i in range(Lq):
            n_keys = i + (Lk - Lq) + 1 if causal else Lk
            s = k[idx][:n_keys] @ q[idx][i] / np.sqrt(d)
            w = np.exp(s - s.max())
            out[idx][i] = (w / w.sum()) @ v[idx][:n_keys]
    return out


def qkv(rng, lead, Lq, Lk, d, dv, dtype=np.float64):
    q = rng.standard_normal(lead + (Lq, d)).astype(dtype)
    k = rng.standard_normal(lead + (Lk, d)).astype(dtype)
    v = rng.standard_normal(lead + (Lk, dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_the_definition(causal):
    q, k, v = qkv(np.random.default_rng(1), (2, 3), 5, 7, 4, 3)
    np.testing.assert_allclose(attention_reference(q, k, v, causal=causal),
                               softmax_attention_by_loops(q, k, v, causal), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(lead=st.sampled_from([(), (1,), (2, 3)]), Lq=st.integers(1, 13), extra_k=st.integers(0, 6),
       d=st.integers(1, 5), dv=st.integers(1, 4), bq=st.integers(1, 9), bk=st.integers(1, 9),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_tiled_equals_reference(lead, Lq, extra_k, d, dv, bq, bk, causal, seed):
    q, k, v = qkv(np.random.default_rng(seed), lead, Lq, Lq + extra_k, d, dv)
    ref = attention_reference(q, k, v, causal=causal)
    out = attention_tiled(q, k, v, causal=causal, block_q=bq, block_k=bk)
    assert out.shape == lead + (Lq, dv)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("L", [1, 63, 64, 65, 130])
def test_block_boundaries_float32(L):
    q, k, v = qkv(np.random.default_rng(L), (2,), L, L, 8, 8, np.float32)
    out = attention_tiled(q, k, v, block_q=64, block_k=32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, attention_reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_online_softmax_is_stable_for_huge_scores():
    # scores of +-1e4 overflow exp() unless the running max is subtracted
    q, k, v = qkv(np.random.default_rng(0), (), 9, 9, 4, 2)
    q *= 1e4
    ref = attention_reference(q, k, v)
    out = attention_tiled(q, k, v, block_q=2, block_k=3)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_decoding_one_query_against_a_cache():
    q, k, v = qkv(np.random.default_rng(2), (3,), 1, 17, 4, 4)
    full_q = np.concatenate([np.zeros((3, 16, 4)), q], axis=1)
    expect = attention_reference(full_q, k, v)[:, -1:]
    np.testing.assert_allclose(attention_tiled(q, k, v, block_k=5), expect, rtol=1e-12)


def test_errors_name_the_op_and_shapes():
    q = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"attention_tiled: expected q .* got q\(2, 4, 3\), k\(2, 4, 5\)"):
        attention_tiled(q, np.zeros((2, 4, 5)), np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"attention_reference: causal attention needs Lq <= Lk"):
        attention_reference(q, np.zeros((2, 2, 3)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="block sizes must be >= 1, got block_q=0"):
        attention_tiled(q, q, q, block_q=0)
    with pytest.raises(ValueError, match="need at least one key"):
        attention_tiled(q, np.zeros((2, 0, 3)), np.zeros((2, 0, 3)), causal=False)


def peak_bytes(fn, *args, **kw):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(*args, **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_tiled_memory_does_not_grow_with_L_squared():
    rng = np.random.default_rng(0)
    peaks = {}
    for L in (256, 1024):
        q, k, v = qkv(rng, (1,), L, L, 16, 16)
        peaks[L] = (peak_bytes(attention_reference, q, k, v),
                    peak_bytes(attention_tiled, q, k, v, block_q=64, block_k=64))
    naive_ratio = peaks[1024][0] / peaks[256][0]
    tiled_ratio = peaks[1024][1] / peaks[256][1]
    assert naive_ratio > 12            # ~16x: L^2
    assert tiled_ratio < 5             # ~4x: L (the output and q, k, v blocks)
    assert peaks[1024][0] > 8 * 1024 * 1024 * 2   # at least two L x L float64 matrices
    assert peaks[1024][1] < peaks[1024][0] / 20


@pytest.mark.gpu
def test_tiled_on_gpu_matches_cpu():
    import cupy as cp
    q, k, v = qkv(np.random.default_rng(0), (2,), 70, 70, 8, 8)
    out = attention_tiled(cp.asarray(q), cp.asarray(k), cp.asarray(v), block_q=32, block_k=16)
    np.testing.assert_allclose(cp.asnumpy(out), attention_reference(q, k, v), rtol=1e-10)
