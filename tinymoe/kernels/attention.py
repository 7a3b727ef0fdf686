"""Scaled dot-product attention on arrays, twice: naive, and tiled with the online softmax.

    out = softmax(Q K^T / sqrt(d) + mask) V            (Vaswani et al. 2017, Eq. 1)

The naive version builds the whole (Lq, Lk) score matrix: memory O(L^2) per head.
The tiled version (the FlashAttention idea, Dao et al. 2022, Algorithm 1) walks over
blocks of keys and keeps, per query row, only a running maximum m, a running sum l
and a running output acc; each new block rescales what came before:

    m_new = max(m, rowmax(S_blk))
    P_blk = exp(S_blk - m_new)
    l     = exp(m - m_new) * l   + rowsum(P_blk)
    acc   = exp(m - m_new) * acc + P_blk V_blk
    out   = acc / l                                    (after the last block)

so its memory is O(L d + block_q block_k): the L x L matrix never exists. Both
return the same numbers (up to rounding). On a GPU the blocks live in on-chip SRAM;
here they show the memory arithmetic and the algebra. Works on NumPy and CuPy arrays.

Masking: with causal=True, query i (of Lq, the last Lq positions of the Lk keys, as
in generation with a KV cache) sees keys j <= i + (Lk - Lq).
"""
from __future__ import annotations

import math

from ..backend import array_module


def _check(op, q, k, v, causal):
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"{op}: q, k, v must have the same rank >= 2 (..., L, d); "
                         f"got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: expected q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv) with "
                         f"equal leading dims; got q{tuple(q.shape)}, k{tuple(k.shape)}, "
                         f"v{tuple(v.shape)}")
    if k.shape[-2] == 0:
        raise ValueError(f"{op}: need at least one key; got k{tuple(k.shape)}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"{op}: causal attention needs Lq <= Lk (queries are the last Lq "
                         f"positions); got q{tuple(q.shape)}, k{tuple(k.shape)}")


def _causal_mask(xp, q_start, q_stop, k_start, k_stop, offset):
    """True where query i may NOT see key j (j > i + offset)."""
    i = xp.arange(q_start, q_stop)[:, None]
    j = xp.arange(k_start, k_stop)[None, :]
    return j > i + offset


def attention_reference(q, k, v, causal=True, scale=None):
    """Naive attention. q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv) -> (..., Lq, dv)."""
    _check("attention_reference", q, k, v, causal)
    xp = array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    Lq, Lk = q.shape[-2], k.shape[-2]
    s = (q @ xp.swapaxes(k, -1, -2)) * scale                          # (..., Lq, Lk)
    if causal:
        s = xp.where(_causal_mask(xp, 0, Lq, 0, Lk, Lk - Lq), -xp.inf, s)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))                     # softmax, stable
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v                                                      # (..., Lq, dv)


def attention_tiled(q, k, v, causal=True, scale=None, block_q=64, block_k=64):
    """Tiled attention with the online softmax; same signature and result as the reference."""
    _check("attention_tiled", q, k, v, causal)
    if int(block_q) < 1 or int(block_k) < 1:
        raise ValueError(f"attention_tiled: block sizes must be >= 1, got block_q={block_q}, "
                         f"block_k={block_k}")
    xp = array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    Lq, Lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    offset = Lk - Lq
    kT = xp.swapaxes(k, -1, -2)                                       # (..., d, Lk)
    out = xp.empty(q.shape[:-1] + (dv,), dtype=xp.result_type(q, v))
    for qs in range(0, Lq, block_q):
        qe = min(qs + block_q, Lq)
        q_blk = q[..., qs:qe, :] * scale                              # (..., bq, d)
        m = xp.full(q_blk.shape[:-1] + (1,), -xp.inf, dtype=out.dtype)    # running max
        l = xp.zeros_like(m)                                          # running sum
        acc = xp.zeros(q_blk.shape[:-1] + (dv,), dtype=out.dtype)     # running P V
        # causal: keys after the last query of this block are never seen; skip them
        k_stop = min(Lk, qe + offset) if causal else Lk
        for ks in range(0, k_stop, block_k):
            ke = min(ks + block_k, k_stop)
            s = q_blk @ kT[..., ks:ke]                                # (..., bq, bk)
            if causal and ke - 1 > qs + offset:                       # block crosses the diagonal
                s = xp.where(_causal_mask(xp, qs, qe, ks, ke, offset), -xp.inf, s)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            p = xp.exp(s - m_new)                                     # (..., bq, bk)
            correction = xp.exp(m - m_new)                            # rescales the old blocks
            l = correction * l + p.sum(axis=-1, keepdims=True)
            acc = correction * acc + p @ v[..., ks:ke, :]
            m = m_new
        out[..., qs:qe, :] = acc / l
    return out
