"""HybridLM: Mamba, attention and Mixture-of-Experts layers in one stack (Jamba-style,
Lieber et al. 2024).

Each layer is a sequence mixer followed by a feed-forward network, both pre-norm
residual:

    h = h + Mixer(RMSNorm(h))      Mixer = causal attention every `attn_every`-th layer,
                                   a MambaBlock otherwise
    h = h + FFN(RMSNorm(h))        FFN = MoE every `moe_every`-th layer, an MLP otherwise

No position embeddings: the Mamba layers see the order of the tokens. Generation
steps token by token: Mamba layers keep their O(1) states, attention layers a KV
cache (which grows; the fewer attention layers, the less memory per token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from ..autograd.grad_mode import no_grad
from ..nn import Embedding, Module, ModuleList, RMSNorm
from ..nn import functional as F
from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.moe import MoELayer
from ..nn.ssm import MambaBlock
from .gpt import MLP
from .lm import RemembersLastLoss, generate_by_recompute, host_ids, ids_on, sample_next


@dataclass
class HybridConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    attn_every: int = 4                 # layer i is attention when (i + 1) % attn_every == 0; 0: none
    n_head: int = 4
    n_kv_head: int | None = None
    d_state: int = 16                   # Mamba layers
    d_conv: int = 4
    expand: int = 2
    scan_impl: str | None = None
    d_ff: int = 256                     # width of the MLP, or of each expert
    activation: str = "gelu"
    num_experts: int = 4                # 0: MLPs only
    moe_every: int = 2                  # layer i has an MoE when (i + 1) % moe_every == 0
    top_k: int = 2
    router: str = "topk"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    rms_eps: float = 1e-5
    block_size: int = 128               # training context length, for the trainer; the
                                        # recurrence itself has no maximum length

    def is_attention_layer(self, i: int) -> bool:
        return self.attn_every > 0 and (i + 1) % self.attn_every == 0

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0


class HybridBlock(Module):
    def __init__(self, cfg: HybridConfig, i: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.rms_eps)
        if cfg.is_attention_layer(i):
            self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, layer_index=i)
        else:
            self.mamba = MambaBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand,
                                    impl=cfg.scan_impl)
        self.norm2 = RMSNorm(cfg.d_model, cfg.rms_eps)
        if cfg.is_moe_layer(i):
            self.moe = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.router,
                                cfg.capacity_factor, cfg.eval_capacity_factor, 0,
                                cfg.activation, cfg.aux_loss_weight, cfg.z_loss_weight)
        else:
            self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation)

    def ffn(self, x):
        return (self.moe if "moe" in self._modules else self.mlp)(self.norm2(x))

    def forward(self, x):
        # x (B, L, d) -> (B, L, d)
        mixer = self.attn if "attn" in self._modules else self.mamba
        x = x + mixer(self.norm1(x))
        return x + self.ffn(x)

    def step(self, x_t, state):
        """One token x_t (B, d); state: the KVCache or this Mamba layer's (conv, ssm) states."""
        if "attn" in self._modules:
            x_t = x_t + self.attn(self.norm1(x_t).reshape(x_t.shape[0], 1, -1), state)[:, 0]
        else:
            x_t = x_t + self.mamba.step(self.norm1(x_t), state)
        return x_t + self.ffn(x_t)


class HybridLM(RemembersLastLoss, Module):
    def __init__(self, config: HybridConfig | None = None, **overrides):
        super().__init__()
        cfg = self.config = config or HybridConfig(**overrides)
        if cfg.n_layer < 1:
            raise ValueError(f"HybridLM: n_layer must be >= 1, got {cfg.n_layer}")
        if cfg.attn_every < 0 or (cfg.num_experts > 0 and cfg.moe_every < 1):
            raise ValueError(f"HybridLM: need attn_every >= 0 and moe_every >= 1, got "
                             f"{cfg.attn_every}, {cfg.moe_every}")
        self.embedding = Embedding(cfg.vocab_size, cfg.d_model, std=0.02)
        self.layers = ModuleList([HybridBlock(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_eps)

    def moe_layers(self):
        return [b.moe for b in self.layers if "moe" in b._modules]

    def forward(self, ids, targets=None):
        """ids (B, L) int -> logits (B, L, V), loss (cross-entropy + MoE aux losses) or None."""
        ids = ids_on(ids, backend.device_of(self.embedding.weight.data), "HybridLM")
        h = self.embedding(ids)                                        # (B, L, d)
        for layer in self.layers:
            h = layer(h)
        logits = F.linear(self.norm_f(h), self.embedding.weight)      # (B, L, V), tied
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits, ids_on(targets, backend.device_of(logits.data), "HybridLM", "targets"))
        self._remember_ce(loss)                                        # model.last_ce, for the logs
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return logits, loss

    def stats(self) -> dict:
        """Router statistics of the last forward, per MoE layer."""
        return {f"layer{i}": b.moe.last_stats for i, b in enumerate(self.layers)
                if "moe" in b._modules}

    def allocate_state(self, batch: int):
        """Per layer: a Mamba layer's (conv, ssm) states, or the shared KVCache."""
        cache = KVCache(self.config.n_layer)
        return [cache if "attn" in b._modules else b.mamba.allocate_state(batch)
                for b in self.layers]

    def step(self, ids_t, state):
        """ids_t (B,) -> logits (B, V); `state` advances by one token."""
        with no_grad():
            h = self.embedding(ids_t)                                  # (B, d)
            for layer, layer_state in zip(self.layers, state):
                h = layer.step(h, layer_state)
            return F.linear(self.norm_f(h), self.embedding.weight)

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True):
        """Sample max_new_tokens after ids (B, L), one recurrent step per token (use_cache=False:
        the parallel forward over the whole sequence for every token instead)."""
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        ids = host_ids(ids)                                                   # (B, L)
        if not use_cache:
            return generate_by_recompute(self, ids, max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()                                                    # MoE eval capacity
        xp = backend.array_module(self.embedding.weight.data)
        state = self.allocate_state(ids.shape[0])
        rng = backend.rng("cpu")
        for t in range(ids.shape[1] - 1):
            self.step(xp.asarray(ids[:, t]), state)
        out, last = [ids], ids[:, -1]
        for _ in range(max_new_tokens):
            z = backend.to_numpy(self.step(xp.asarray(last), state).data).astype(np.float64)
            last = sample_next(z, temperature, top_k, rng)
            out.append(last[:, None])
        self.train(was_training)
        return np.concatenate(out, axis=1)
