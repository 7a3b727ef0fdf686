"""Model arithmetic: parameters and FLOPs per token of dense, MoE and Mamba models.

The lectures argue with three numbers per model:
- N, the parameter count (what memory must hold),
- the FLOPs per token of a forward pass (what compute must do), about 2 N_active:
  every weight is used in one multiply-add (2 FLOPs) per token,
- C = 6 N D, the FLOPs of training on D tokens (forward 2ND + backward 4ND).

A dense model uses every parameter for every token, so FLOPs/token tracks N. A
Mixture-of-Experts layer holds E expert FFNs but runs only k of them per token: the
total N grows with E, the *active* N (and the FLOPs) with k. The table of Switch
Transformers (Fedus et al. 2021, Table 9) shows it: Switch-Base holds 33x the
parameters of T5-Base at the same FLOPs per sequence. `switch_table()` rebuilds it.

FLOP convention: a multiply-add is 2 FLOPs; a matmul (m, k) @ (k, n) is 2 m k n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


# --------------------------------------------------------------- transformers
@dataclass(frozen=True)
class TransformerShape:
    """A decoder-only (GPT) transformer, dense or MoE.

    d_ff is the hidden width of one FFN (of one expert in an MoE layer).
    n_kv_heads: None = multi-head (MHA), 1 = multi-query (MQA), between = grouped (GQA).
    num_experts = 0 makes every FFN dense; otherwise every `moe_every`-th FFN
    (layers moe_every-1, 2*moe_every-1, ...) is an MoE layer with `top_k` routed and
    `num_shared` always-on experts.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None
    gated_ffn: bool = False        # SwiGLU/GEGLU: 3 matrices instead of 2
    bias: bool = False             # biases in Linear layers
    norm_params: int = 1           # per-norm vectors: 1 = RMSNorm, 2 = LayerNorm
    tie_embeddings: bool = True
    max_seq_len: int = 0           # learned position embeddings (0 = none)
    num_experts: int = 0
    top_k: int = 1
    moe_every: int = 1
    num_shared: int = 0

    @property
    def d_head(self) -> int:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerShape: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.num_experts == 0 else self.n_layers // self.moe_every


def attention_params(s: TransformerShape) -> int:
    """W_Q (d, d), W_K and W_V (d, kv_heads * d_head), W_O (d, d), + biases."""
    d, d_kv = s.d_model, s.kv_heads * s.d_head
    weights = d * d + 2 * d * d_kv + d * d
    biases = (d + 2 * d_kv + d) if s.bias else 0
    return weights + biases


def ffn_params(s: TransformerShape) -> int:
    """One FFN / expert: d -> d_ff -> d (gated: two input matrices)."""
    n_in = 2 if s.gated_ffn else 1
    weights = (n_in + 1) * s.d_model * s.d_ff
    biases = (n_in * s.d_ff + s.d_model) if s.bias else 0
    return weights + biases


@dataclass(frozen=True)
class ParamCount:
    total: int        # every parameter the model stores
    active: int       # parameters used for one token (MoE: k of E experts)
    embedding: int    # token (+ position) embeddings and an untied LM head

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def transformer_params(s: TransformerShape) -> ParamCount:
    """Parameters of a GPT: embeddings, n_layers x (norm, attention, norm, FFN/MoE), final norm."""
    norms = s.norm_params * s.d_model
    embedding = s.vocab_size * s.d_model + s.max_seq_len * s.d_model
    if not s.tie_embeddings:
        embedding += s.vocab_size * s.d_model + (s.vocab_size if s.bias else 0)
    per_layer = 2 * norms + attention_params(s)
    ffn = ffn_params(s)
    router = s.d_model * s.num_experts                 # gate: (d, E), no bias
    moe_total = router + (s.num_experts + s.num_shared) * ffn
    moe_active = router + (s.top_k + s.num_shared) * ffn
    n_moe = s.n_moe_layers
    n_dense = s.n_layers - n_moe
    base = embedding + s.n_layers * per_layer + n_dense * ffn + norms
    return ParamCount(total=base + n_moe * moe_total, active=base + n_moe * moe_active,
                      embedding=embedding)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, split by where they go."""

    weights: int      # 2 x active non-embedding weights (+ the LM head)
    attention: int    # scores Q K^T and the weighted sum A V
    router: int = 0   # the MoE gate (already inside `weights`; shown for the slide)

    @property
    def forward(self) -> int:
        return self.weights + self.attention

    @property
    def training(self) -> int:
        """Forward + backward: the backward costs twice the forward (dx and dW)."""
        return 3 * self.forward


def transformer_flops_per_token(s: TransformerShape, seq_len: int, causal_skip: bool = False) -> FlopCount:
    """Forward FLOPs for one token with a context of `seq_len` tokens.

    weights: every active matmul weight is one multiply-add per token, 2 FLOPs; the
    LM head (vocab x d) counts, the embedding lookup (a gather) does not, nor do
    norms and bias adds (O(d) per token).
    attention: per layer, q . k over seq_len keys and the weighted sum of seq_len
    values: 2 * 2 * seq_len * n_heads * d_head (Kaplan et al. 2020, Table 1, counts
    one of the two). causal_skip=True halves it (only the lower triangle is
    computed, as FlashAttention does); tinymoe's naive attention computes the square.
    """
    d, d_kv = s.d_model, s.kv_heads * s.d_head
    attn = 2 * d * d + 2 * d * d_kv
    ffn = (3 if s.gated_ffn else 2) * d * s.d_ff
    n_moe = s.n_moe_layers
    router = d * s.num_experts
    matmul = (s.n_layers * attn + (s.n_layers - n_moe) * ffn
              + n_moe * (router + (s.top_k + s.num_shared) * ffn) + s.vocab_size * d)
    attention = s.n_layers * 4 * seq_len * s.n_heads * s.d_head
    if causal_skip:
        attention //= 2
    return FlopCount(weights=2 * matmul, attention=attention, router=2 * n_moe * router)


# ---------------------------------------------------------------------- Mamba
@dataclass(frozen=True)
class MambaShape:
    """A Mamba language model (Gu & Dao 2023): n_layers x (RMSNorm, Mamba block)."""

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None     # None = ceil(d_model / 16), as in the paper's code
    tie_embeddings: bool = True

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank


def mamba_block_params(s: MambaShape) -> dict:
    """Parameters of one Mamba block, by the names of the public checkpoints."""
    d, di, n, r = s.d_model, s.d_inner, s.d_state, s.rank
    return {
        "in_proj": d * 2 * di,                 # x and the gate z, no bias
        "conv1d": di * s.d_conv + di,          # depthwise causal conv, with bias
        "x_proj": di * (r + 2 * n),            # -> (delta low-rank, B, C), no bias
        "dt_proj": r * di + di,                # delta: rank -> d_inner, with bias
        "A_log": di * n,
        "D": di,
        "out_proj": di * d,
    }


def mamba_params(s: MambaShape) -> ParamCount:
    block = sum(mamba_block_params(s).values()) + s.d_model      # + its RMSNorm
    embedding = s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)
    total = embedding + s.n_layers * block + s.d_model            # + final norm
    return ParamCount(total=total, active=total, embedding=embedding)


# FLOPs of the selective scan per (channel, state) per token, as our reference
# kernel computes them: delta*A (1), exp (1, counted as one FLOP), (delta*u)*B (1),
# h = dA*h + dBu (2), y += C*h (2).
SCAN_FLOPS_PER_STATE = 7
# ... and per channel per token: delta*u (1), y + D*u (2), y * silu(z) (5: neg,
# exp, add, div, mul).
SCAN_FLOPS_PER_CHANNEL = 8


def mamba_flops_per_token(s: MambaShape) -> FlopCount:
    """Forward FLOPs per token: independent of the sequence length (no attention)."""
    p = mamba_block_params(s)
    matmul = p["in_proj"] + p["x_proj"] + (p["dt_proj"] - s.d_inner) + p["out_proj"]
    conv = 2 * s.d_inner * s.d_conv
    scan = SCAN_FLOPS_PER_STATE * s.d_inner * s.d_state + SCAN_FLOPS_PER_CHANNEL * s.d_inner
    weights = s.n_layers * (2 * matmul + conv + scan) + 2 * s.vocab_size * s.d_model
    return FlopCount(weights=weights, attention=0)


# ------------------------------------------------------------- the 6ND rule
def training_flops(n_params: float, n_tokens: float) -> float:
    """C = 6 N D: 2 N D for the forward, 4 N D for the backward (Kaplan et al. 2020)."""
    return 6.0 * n_params * n_tokens


# ------------------------------------------- T5 vs Switch (encoder-decoder)
@dataclass(frozen=True)
class T5Shape:
    """T5 (Raffel et al. 2020): encoder and decoder of n_layers each, ReLU FFN,
    RMS-style layer norms (1 vector), no biases, relative position biases (32 buckets
    per head, in the first layer of each stack), embeddings tied with the LM head.
    num_experts > 0 makes it a Switch Transformer: every `moe_every`-th FFN of
    both stacks becomes a top-1 MoE layer."""

    name: str
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    d_kv: int = 64
    vocab_size: int = 32128
    num_experts: int = 0
    moe_every: int = 2
    rel_buckets: int = 32


def _t5_pieces(s: T5Shape):
    d, inner = s.d_model, s.n_heads * s.d_kv
    attn = 4 * d * inner                                # q, k, v, o
    ffn = 2 * d * s.d_ff
    n_moe = s.n_layers // s.moe_every if s.num_experts else 0
    moe_extra = s.d_model * s.num_experts + (s.num_experts - 1) * ffn if s.num_experts else 0
    return d, attn, ffn, n_moe, moe_extra


def t5_params(s: T5Shape) -> ParamCount:
    d, attn, ffn, n_moe, moe_extra = _t5_pieces(s)
    rel = 2 * s.rel_buckets * s.n_heads                  # one table per stack
    encoder = s.n_layers * (attn + ffn + 2 * d) + d
    decoder = s.n_layers * (2 * attn + ffn + 3 * d) + d
    embedding = s.vocab_size * d
    dense = embedding + encoder + decoder + rel
    total = dense + 2 * n_moe * moe_extra                 # MoE layers in both stacks
    active = dense + 2 * n_moe * s.d_model * s.num_experts
    return ParamCount(total=total, active=active, embedding=embedding)


def t5_flops_per_sequence(s: T5Shape, input_len: int = 512, target_len: int = 128) -> float:
    """Forward FLOPs of one sequence, counted as 2 FLOPs per weight per token: encoder
    weights for each input token, decoder weights and the LM head for each target
    token (top-1 routing: one expert per token, plus the router). Attention scores
    are not counted: the paper does not state its convention, and this one lands
    within 2% of its numbers."""
    d, attn, ffn, n_moe, moe_extra = _t5_pieces(s)
    router = s.d_model * s.num_experts
    encoder = s.n_layers * (attn + ffn) + n_moe * router
    decoder = s.n_layers * (2 * attn + ffn) + n_moe * router + s.vocab_size * d
    return 2.0 * (encoder * input_len + decoder * target_len)


# The configs of the public checkpoints (t5-base, t5-large, switch-base-128,
# switch-large-128) and the numbers the Switch Transformer paper prints for them.
T5_BASE = T5Shape("T5-Base", d_model=768, d_ff=3072, n_layers=12, n_heads=12)
T5_LARGE = T5Shape("T5-Large", d_model=1024, d_ff=4096, n_layers=24, n_heads=16)
SWITCH_BASE = T5Shape("Switch-Base", d_model=768, d_ff=3072, n_layers=12, n_heads=12, num_experts=128)
SWITCH_LARGE = T5Shape("Switch-Large", d_model=1024, d_ff=4096, n_layers=24, n_heads=16, num_experts=128)
PUBLISHED = {  # name: (parameters, forward FLOPs per sequence), Fedus et al. 2021
    "T5-Base": (223e6, 124e9),
    "Switch-Base": (7.4e9, 124e9),
    "T5-Large": (739e6, 425e9),
    "Switch-Large": (26.3e9, 425e9),
}


def switch_table() -> list[dict]:
    """The lecture's table, computed from the configs beside the published numbers."""
    rows = []
    for s in (T5_BASE, SWITCH_BASE, T5_LARGE, SWITCH_LARGE):
        p = t5_params(s)
        pub_params, pub_flops = PUBLISHED[s.name]
        rows.append({
            "model": s.name,
            "params": p.total,
            "active_params": p.active,
            "flops_per_seq": t5_flops_per_sequence(s),
            "paper_params": pub_params,
            "paper_flops_per_seq": pub_flops,
        })
    return rows
