"""Causal multi-head self-attention with grouped K/V heads (MHA, GQA, MQA) and a KV cache.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V        (Vaswani et al. 2017, eq. 1)

M is the causal mask (-inf above the diagonal). n_heads query heads share n_kv_heads
key/value heads (Ainslie et al. 2023): n_kv_heads = n_heads is MHA, 1 is MQA (Shazeer
2019), anything in between is GQA; a group of G = n_heads / n_kv_heads query heads reads
the same K, V. The KV cache stores past keys and values so generating a token costs one
query against the cache instead of recomputing the whole prefix. With `rope_base` set, queries
and keys are rotated by their positions (RoPE, `rope.py`) before the cache stores the keys.
"""
from __future__ import annotations

import math
from functools import lru_cache

from .. import backend
from ..autograd.function import Function
from ..autograd.ops import sum_to_shape
from ..dtypes import accumulation_dtype, upcast
from ..kernels import softmax as fused_softmax
from ..kernels.matmul import matmul as mm           # 16-bit aware; cuBLAS directly while capturing
from . import functional as F
from .linear import Linear
from .module import Module
from .rope import apply_rope


@lru_cache(maxsize=32)
def causal_mask(Lq: int, Lk: int, dtype: str, device: str):
    """M (Lq, Lk): 0 where query i (the last Lq of Lk positions) may look, -inf in its future.
    Added to the scores, not assigned through a boolean index: one broadcast add, 30x faster
    in NumPy at (16, 4, 128, 128)."""
    xp = backend.module_for(device)
    future = xp.arange(Lk)[None, :] > xp.arange(Lq)[:, None] + (Lk - Lq)      # (Lq, Lk)
    return xp.where(future, -xp.inf, 0.0).astype(dtype)


class CausalAttention(Function):
    """out = P V,  P = softmax(S),  S = Q K^T * scale + M   (queries = the last Lq of Lk positions)
    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dP * P));  dQ = dS K * scale;  dK = dS^T Q * scale

    rowsum(dP * P) = rowsum(dO * O) (FlashAttention-2's D): an (Lq,) vector from (Lq, d)
    arrays, so that the backward holds one (Lq, Lk) temporary, dP, turned into dS in place.

    keep_probs=False is selective recomputation (Korthikanti et al. 2022; FlashAttention's
    backward): instead of P, the (Lq, Lk) term of the activations, keep the softmax's log
    normalizer lse = m + log sum_j e^(S_j - m) per row, (Lq,), and in the backward rebuild
    P = exp(S - lse) from Q and K: one more Q K^T, and no O(L^2) array between the passes.

    Shapes: q (B, Hkv, G, Lq, d), k, v (B, Hkv, 1, Lk, d): the group axis G broadcasts, and
    the K/V gradients are summed over it (sum_to_shape).

    The array code below is the spec (and the CPU's path). On a GPU the softmax and its
    backward are one kernel each (kernels/softmax.cu: the mask by index, sums in float32),
    around the same GEMMs: 2 passes over the (Lq, Lk) scores instead of ~14."""

    @staticmethod
    def forward(ctx, q, k, v, keep_probs=True):
        ctx.scale = 1.0 / math.sqrt(q.shape[-1])
        ctx.keep_probs = keep_probs
        xp = backend.array_module(q)
        ctx.fused = backend.is_cupy_array(q) and fused_softmax.supports(q, k, v)
        if ctx.fused:
            s = mm(q, xp.swapaxes(k, -1, -2))                                 # (B, Hkv, G, Lq, Lk)
            p, lse = fused_softmax.causal_softmax_forward(s, ctx.scale, keep_lse=not keep_probs)
            out = mm(p, v)                                                    # (B, Hkv, G, Lq, d)
            ctx.save(q, k, v, p if keep_probs else lse, out)
            return out
        s = CausalAttention._scores(q, k, ctx.scale)                          # (B, Hkv, G, Lq, Lk)
        m = s.max(axis=-1, keepdims=True)
        s -= m
        p = xp.exp(s, out=s)
        total = p.sum(axis=-1, keepdims=True)                                 # (B, Hkv, G, Lq, 1)
        p /= total                                                            # softmax
        p = p.astype(q.dtype, copy=False)                                     # 16-bit P for P V
        out = mm(p, v)                                                        # (B, Hkv, G, Lq, d)
        if keep_probs:
            ctx.save(q, k, v, p, out)
        else:
            ctx.save(q, k, v, m + xp.log(total), out)                         # lse, not P
        return out

    @staticmethod
    def _scores(q, k, scale):
        """S = Q K^T * scale + M, M = -inf where a query would see the future: (..., Lq, Lk).
        In float32 for 16-bit q, k (the softmax's max, exp and sums are taken on it)."""
        xp = backend.array_module(q)
        s = mm(q, xp.swapaxes(k, -1, -2)).astype(accumulation_dtype(q.dtype), copy=False)
        s *= scale
        s += causal_mask(q.shape[-2], k.shape[-2], s.dtype.str, backend.device_of(s))
        return s

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p, out = ctx.saved
        xp = backend.array_module(grad)
        grad = grad.astype(q.dtype, copy=False)
        if ctx.fused:
            if not ctx.keep_probs:                                            # P from S and lse
                p = fused_softmax.causal_softmax_recompute(mm(q, xp.swapaxes(k, -1, -2)), ctx.scale, p)
            dv = sum_to_shape(mm(xp.swapaxes(p, -1, -2), grad), v.shape)
            dp = mm(grad, xp.swapaxes(v, -1, -2))                             # (B, Hkv, G, Lq, Lk)
            ds = fused_softmax.causal_softmax_backward(dp, p, grad, out, ctx.scale, inplace=True)
            dq = mm(ds, k)
            dk = sum_to_shape(mm(xp.swapaxes(ds, -1, -2), q), k.shape)
            return dq, dk, dv
        if not ctx.keep_probs:                                                # lse was kept:
            s = CausalAttention._scores(q, k, ctx.scale)                      # recompute P
            s -= p
            p = xp.exp(s, out=s).astype(q.dtype, copy=False)                  # P = exp(S - lse)
        dv = sum_to_shape(mm(xp.swapaxes(p, -1, -2), grad), v.shape)
        g32, out32 = upcast(grad, out)                                        # float32 for 16 bits
        rowsum = (g32 * out32).sum(axis=-1, keepdims=True)                    # (B, Hkv, G, Lq, 1)
        ds = mm(grad, xp.swapaxes(v, -1, -2))                                 # dP (B, Hkv, G, Lq, Lk)
        ds = ds.astype(rowsum.dtype, copy=False)
        ds -= rowsum                                                          # softmax backward,
        ds *= p                                                               # in place
        ds *= ctx.scale
        ds = ds.astype(q.dtype, copy=False)
        dq = mm(ds, k)
        dk = sum_to_shape(mm(xp.swapaxes(ds, -1, -2), q), k.shape)
        return dq, dk, dv


class KVCache:
    """Keys and values of the positions seen so far, one (k, v) pair per layer.

    k, v: (B, Hkv, 1, S, d_head) arrays (no gradient: generation runs under no_grad)."""

    def __init__(self, n_layers: int):
        self.layers = [None] * n_layers

    @property
    def length(self) -> int:
        return self.length_at(0)

    def length_at(self, layer: int) -> int:
        """Positions cached for one layer (layer 0 runs first: it may be one step ahead)."""
        kv = self.layers[layer]
        return 0 if kv is None else kv[0].shape[-2]

    def update(self, layer: int, k, v):
        """Append the new positions' k, v; return all of them."""
        if self.layers[layer] is not None:
            xp = backend.array_module(k)
            old_k, old_v = self.layers[layer]
            k, v = xp.concatenate([old_k, k], axis=-2), xp.concatenate([old_v, v], axis=-2)
        self.layers[layer] = (k, v)
        return k, v


class MultiHeadAttention(Module):
    """Causal self-attention: x (B, L, d_model) -> (B, L, d_model).
    rope_base: None (positions come from elsewhere, e.g. GPT-2's learned table), or the
    base of RoPE's angles (10000 in RoFormer and Llama, 1e6 in Mixtral)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 bias: bool = False, dropout: float = 0.0, layer_index: int = 0,
                 recompute_scores: bool = False, rope_base: float | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by "
                             f"n_heads={n_heads}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"MultiHeadAttention: n_heads={n_heads} must be a multiple of "
                             f"n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_model // n_heads
        self.dropout, self.layer_index = dropout, layer_index
        self.recompute_scores = recompute_scores      # keep lse, not the (L, L) probabilities
        self.rope_base = rope_base
        # One projection for q, k, v: (H + 2 Hkv) heads of d_head.
        self.qkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * self.d_head, bias=bias)
        self.proj = Linear(n_heads * self.d_head, d_model, bias=bias)

    def forward(self, x, cache: KVCache | None = None):
        B, L, _ = x.shape
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        G = H // Hkv
        qkv = self.qkv(x).reshape(B, L, Hkv, G + 2, dh)                      # per kv group: G q heads, k, v
        qkv = qkv.transpose(0, 2, 3, 1, 4)                                    # (B, Hkv, G+2, L, dh)
        q, k, v = qkv.split([G, 1, 1], axis=2)                             # (B, Hkv, G|1|1, L, dh)
        if self.rope_base is not None:                                        # rotate by position
            start = cache.length_at(self.layer_index) if cache is not None else 0
            q, k = apply_rope(q, start, self.rope_base), apply_rope(k, start, self.rope_base)
        if cache is not None:
            k_all, v_all = cache.update(self.layer_index, k.data, v.data)     # (B, Hkv, 1, S, dh)
            y = CausalAttention.apply(q, k_all, v_all)
        else:
            y = CausalAttention.apply(q, k, v, keep_probs=not self.recompute_scores)  # (B, Hkv, G, L, dh)
        y = y.transpose(0, 3, 1, 2, 4).reshape(B, L, H * dh)                 # heads side by side
        y = self.proj(y)
        return F.dropout(y, self.dropout, self.training)

    def extra_repr(self):
        rope = f", rope_base={self.rope_base:g}" if self.rope_base is not None else ""
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, d_head={self.d_head}{rope}"
