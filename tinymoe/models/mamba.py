"""MambaLM: a language model of residual Mamba blocks (Gu & Dao 2023, Sec. 3.4).

    h_0 = embedding[ids]                                   (B, L, d_model), no positions:
                                                           the recurrence knows the order
    h   = h + MambaBlock(RMSNorm(h))                       every layer (pre-norm residual)
    logits = RMSNorm(h) embedding^T                        tied output embedding (or, with
                                                           tie_embeddings=False, lm_head^T)

Generation runs the recurrent mode: each layer keeps a conv state (B, d_inner, d_conv)
and an SSM state (B, d_inner, N), so a new token costs the same time and memory
however long the text already is (no KV cache that grows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..autograd.grad_mode import no_grad
from ..nn import Embedding, Linear, Module, ModuleList, RMSNorm, recompute
from ..nn import functional as F
from ..nn.ssm import MambaBlock, S4DBlock
from .decode_graph import captured_decoder
from .lm import RemembersLastLoss, check_token_ids, generate_by_recompute, host_ids, ids_on, sample_next


@dataclass
class MambaConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16                   # N, the SSM state size per channel
    d_conv: int = 4                     # causal conv width
    expand: int = 2                     # d_inner = expand * d_model
    dt_rank: int | None = None          # None = ceil(d_model / 16)
    rms_eps: float = 1e-5
    scan_impl: str | None = None        # selective-scan kernel; None = fastest for the device
    mixer: str = "mamba"                # "mamba" (selective S6) | "s4d" (LTI baseline)
    block_size: int = 128               # training context length, for the trainer; the
                                        # recurrence itself has no maximum length
    recompute: bool = False             # keep only each layer's input; rerun it in backward
    tie_embeddings: bool = True         # False: an output head lm_head of its own


class ResidualBlock(Module):
    """x + mixer(norm(x)); the mixer is a MambaBlock (or, in hybrids, any sequence layer)."""

    def __init__(self, d_model: int, mixer: Module, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))                           # (B, L, d)

    def step(self, x_t, state):
        return x_t + self.mixer.step(self.norm(x_t), state)           # (B, d)


class MambaLM(RemembersLastLoss, Module):
    def __init__(self, config: MambaConfig | None = None, **overrides):
        super().__init__()
        cfg = self.config = config or MambaConfig(**overrides)
        if cfg.n_layer < 1:
            raise ValueError(f"MambaLM: n_layer must be >= 1, got {cfg.n_layer}")
        self.embedding = Embedding(cfg.vocab_size, cfg.d_model, std=0.02)
        if cfg.mixer not in ("mamba", "s4d"):
            raise ValueError(f"MambaLM: mixer must be 'mamba' or 's4d', got {cfg.mixer!r}")
        self.layers = ModuleList([ResidualBlock(cfg.d_model, self._mixer(cfg), cfg.rms_eps)
                                  for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Mamba's init: out_proj, which writes into the residual stream, scaled by
        # 1/sqrt(n_layer) so the stream's variance does not grow with depth (GPT-2).
        for layer in self.layers:
            layer.mixer.out_proj.weight.data[...] /= math.sqrt(cfg.n_layer)

    @staticmethod
    def _mixer(cfg):
        if cfg.mixer == "s4d":
            return S4DBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand)
        return MambaBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank,
                          impl=cfg.scan_impl)

    def _logits(self, h):
        head = self.embedding if self.config.tie_embeddings else self.lm_head
        return F.linear(self.norm_f(h), head.weight)                   # (B, L, V)

    def forward(self, ids, targets=None):
        """ids (B, L) int -> logits (B, L, V), mean cross-entropy (or None)."""
        ids = ids_on(ids, backend.device_of(self.embedding.weight.data), "MambaLM")
        h = self.embedding(ids)                                        # (B, L, d)
        for layer in self.layers:
            h = recompute(layer, h) if self.config.recompute else layer(h)
        logits = self._logits(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits, ids_on(targets, backend.device_of(logits.data), "MambaLM", "targets"))
        self._remember_ce(loss)                                        # model.last_ce, for the logs
        return logits, loss

    def stats(self) -> dict:
        return {}

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> list:
        """Write a Hugging Face MambaForCausalLM folder (docs/pretrained.md)."""
        from .pretrained import save_pretrained
        return save_pretrained(self, path, max_shard_bytes)

    # ----------------------------------------------------------- recurrent mode
    def allocate_state(self, batch: int):
        """One (conv_state, ssm_state) per layer: the whole memory of the model."""
        return [layer.mixer.allocate_state(batch) for layer in self.layers]

    def step(self, ids_t, state):
        """One token per sequence: ids_t (B,) -> logits (B, V); `state` updated in place."""
        with no_grad():
            h = self.embedding(ids_t)                                  # (B, d)
            for layer, layer_state in zip(self.layers, state):
                h = layer.step(h, layer_state)
            return self._logits(h)

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True):
        """Sample max_new_tokens after ids (B, L) with the recurrent step: the prompt is
        read token by token into the states, then each new token costs O(1); on a GPU each
        token is one replay of the step captured as a CUDA graph (decode_graph.py).
        use_cache=False reruns the parallel (convolutional/scan) forward over the whole
        sequence for every token instead: O(L) per token, the same samples."""
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        ids = host_ids(ids)                                                   # (B, L)
        if not use_cache:
            return generate_by_recompute(self, ids, max_new_tokens, temperature, top_k)
        check_token_ids(ids, self.config.vocab_size, "generate")
        decode = captured_decoder(self, ids.shape[0])                  # a GPU: one graph per token
        if decode is None:                                             # the CPU: step by step
            xp = backend.array_module(self.embedding.weight.data)
            state = self.allocate_state(ids.shape[0])

            def decode(ids_t):
                return self.step(xp.asarray(ids_t), state).data       # (B, V)
        rng = backend.rng("cpu")
        for t in range(ids.shape[1] - 1):                              # read the prompt
            decode(ids[:, t])
        out = [ids]
        last = ids[:, -1]
        for _ in range(max_new_tokens):
            logits = decode(last)                                      # (B, V)
            z = backend.to_numpy(logits).astype(np.float64)
            last = sample_next(z, temperature, top_k, rng)
            out.append(last[:, None])
        return np.concatenate(out, axis=1)
