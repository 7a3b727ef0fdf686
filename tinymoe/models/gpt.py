"""GPT: a decoder-only transformer language model, with a dense or a Mixture-of-Experts FFN.

    h_0 = wte[ids] + wpe[positions]                              token + position embeddings
    h   = h + Attention(LayerNorm(h))                            every block (pre-norm)
    h   = h + FFN(LayerNorm(h))     FFN = MLP, or MoE in every (or every other) block
    logits = LayerNorm(h) wte^T                                  tied output embedding

loss = cross-entropy(logits, targets) + the routers' weighted aux losses.

Config options turn it into the Llama / Mixtral family: position="rope" (no wpe: queries and
keys rotated by position), norm="rmsnorm", tie_embeddings=False (logits = h lm_head^T with a
head of its own), n_kv_head (GQA), activation="swiglu". Mixtral = all of these + MoE in every
block with a top-2 router, dropless.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..autograd.grad_mode import no_grad
from ..nn import Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm, recompute
from ..nn import functional as F
from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.moe import MoELayer
from .lm import RemembersLastLoss, host_ids, ids_on, sample_next


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128               # context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None        # None = n_head (MHA); 1 = MQA; else GQA
    d_model: int = 128
    d_ff: int = 512                     # hidden width of the MLP, or of each expert
    activation: str = "gelu"            # "gelu" | "swiglu" | "relu"
    dropout: float = 0.0
    bias: bool = False
    # Mixture of Experts (num_experts = 0: a dense GPT)
    num_experts: int = 0
    top_k: int = 2
    router: str = "topk"
    moe_every: int = 1                  # 1: MoE in every block; 2: every other block (1, 3, ...)
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None   # dropless: cached generation == full recompute
    num_shared_experts: int = 0
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    recompute: bool = False             # keep only each block's input; rerun it in backward
    recompute_attention: bool = False   # keep the softmax's lse, not the (L, L) probabilities
    position: str = "learned"           # "learned" (GPT-2's wpe table) | "rope" (rotary, no table)
    rope_base: float = 10000.0          # RoPE's theta_i = rope_base^(-2i / d_head)
    norm: str = "layernorm"             # "layernorm" | "rmsnorm" (no centering, no bias)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True         # False: an output head lm_head of its own

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0


class MLP(Module):
    """FFN(x) = act(x W1) W2, or SwiGLU: (silu(x W1) * x W3) W2  (Shazeer 2020)."""

    def __init__(self, d_model, d_ff, activation="gelu", bias=False, dropout=0.0):
        super().__init__()
        self.activation, self.dropout = activation, dropout
        self.fc1 = Linear(d_model, d_ff, bias=bias)
        self.fc2 = Linear(d_ff, d_model, bias=bias)
        if activation == "swiglu":
            self.fc3 = Linear(d_model, d_ff, bias=bias)

    def forward(self, x):
        h = self.fc1(x)                                                       # (B, L, f)
        if self.activation == "swiglu":
            h = F.silu(h) * self.fc3(x)
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return F.dropout(self.fc2(h), self.dropout, self.training)           # (B, L, d)


def make_norm(cfg: GPTConfig):
    """The config's normalization over d_model (ln1, ln2, ln_f keep their names either way)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


class Block(Module):
    def __init__(self, cfg: GPTConfig, i: int):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.bias,
                                       cfg.dropout, layer_index=i,
                                       recompute_scores=cfg.recompute_attention,
                                       rope_base=cfg.rope_base if cfg.position == "rope" else None)
        self.ln2 = make_norm(cfg)
        if cfg.is_moe_layer(i):
            self.moe = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.router,
                                cfg.capacity_factor, cfg.eval_capacity_factor,
                                cfg.num_shared_experts, cfg.activation, cfg.aux_loss_weight,
                                cfg.z_loss_weight)
        else:
            self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias, cfg.dropout)

    def forward(self, x, cache=None):
        # x (B, L, d) -> (B, L, d)
        x = x + self.attn(self.ln1(x), cache)
        ffn = self.moe if "moe" in self._modules else self.mlp
        return x + ffn(self.ln2(x))


class GPT(RemembersLastLoss, Module):
    def __init__(self, config: GPTConfig | None = None, **overrides):
        super().__init__()
        cfg = self.config = config or GPTConfig(**overrides)
        if cfg.n_layer < 1 or cfg.block_size < 1:
            raise ValueError(f"GPT: n_layer and block_size must be >= 1, got {cfg.n_layer}, {cfg.block_size}")
        if cfg.recompute and cfg.num_experts:
            raise ValueError("GPT: recompute=True needs a dense model (num_experts=0): an MoE block's "
                             "aux losses are added to the loss outside the block, so a recomputed "
                             "block would lose their gradients")
        if cfg.position not in ("learned", "rope"):
            raise ValueError(f"GPT: position must be 'learned' or 'rope', got {cfg.position!r}")
        if cfg.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"GPT: norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}")
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.wpe = Embedding(cfg.block_size, cfg.d_model)
        self.blocks = ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        """GPT-2: N(0, 0.02) everywhere, N(0, 0.02 / sqrt(2 n_layer)) for the projections
        that write into the residual stream, zeros for biases."""
        rng = backend.rng("cpu")
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                continue                                     # LayerNorm weights/biases, Linear biases
            std = resid_std if name.endswith(("proj.weight", "fc2.weight", "w2")) else 0.02
            p.data[...] = rng.standard_normal(p.shape).astype(p.dtype) * std
        for module in self.modules():
            if isinstance(module, Linear) and module.bias is not None:
                module.bias.data[...] = 0

    def moe_layers(self):
        return [b.moe for b in self.blocks if "moe" in b._modules]

    def forward(self, ids, targets=None, cache: KVCache | None = None):
        """ids (B, L) int -> logits (B, L, V), loss (mean cross-entropy + aux losses) or None."""
        device = backend.device_of(self.wte.weight.data)
        ids = ids_on(ids, device, "GPT")                                     # (B, L)
        B, L = ids.shape
        start = cache.length if cache is not None else 0
        if start + L > self.config.block_size:
            raise ValueError(f"GPT: sequence of {start + L} positions exceeds block_size="
                             f"{self.config.block_size}")
        x = self.wte(ids)                                                    # (B, L, d)
        if self.config.position == "learned":
            x = x + self.wpe(backend.module_for(device).arange(start, start + L))
        for block in self.blocks:
            if self.config.recompute and cache is None:
                x = recompute(block, x)                  # keeps x alone; block reruns in backward
            else:
                x = block(x, cache)
        x = self.ln_f(x)
        head = self.wte if self.config.tie_embeddings else self.lm_head
        logits = F.linear(x, head.weight)                                     # (B, L, V)
        if targets is None:
            return logits, None
        targets = ids_on(targets, device, "GPT", "targets")
        loss = F.cross_entropy(logits, targets)
        self._remember_ce(loss)                                        # model.last_ce, for the logs
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return logits, loss

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> list:
        """Write a Hugging Face MixtralForCausalLM folder (docs/pretrained.md)."""
        from .pretrained import save_pretrained
        return save_pretrained(self, path, max_shard_bytes)

    def stats(self) -> dict:
        """Router statistics of the last forward, per MoE block: {"layer3": {...}, ...}."""
        return {f"layer{i}": b.moe.last_stats for i, b in enumerate(self.blocks)
                if "moe" in b._modules}

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True):
        """Sample max_new_tokens after ids (B, L); returns (B, L + max_new_tokens) ids.

        With the KV cache each new token costs one query; when the context is full, the cache
        is rebuilt from the last block_size // 2 tokens."""
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        ids = host_ids(ids)                                                   # (B, L)
        block = self.config.block_size
        was_training = self.training
        self.eval()
        rng = backend.rng("cpu")
        cache, fresh = None, True
        with no_grad():
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits, _ = self(ids[:, -block:])
                elif fresh or cache.length >= block:
                    cache = KVCache(self.config.n_layer)
                    logits, _ = self(ids[:, -(block // 2 if not fresh else block):], cache=cache)
                    fresh = False
                else:
                    logits, _ = self(ids[:, -1:], cache=cache)
                z = backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)   # (B, V)
                ids = np.concatenate([ids, sample_next(z, temperature, top_k, rng)[:, None]], axis=1)
        self.train(was_training)
        return ids
