"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

    y(x) = sum_{j < k} g_j(x) f_{e_j(x)}(x)  [+ sum_s f^shared_s(x)]

(Shazeer et al. 2017, eq. 1, with DeepSeekMoE's always-active shared experts.) Each
expert e keeps at most  C = ceil(capacity_factor * T * k / E)  slots (GShard, Switch);
the overflow is dropped, and a dropped token's MoE output is 0, so it goes on through
the residual connection only. capacity_factor=None routes every slot ("dropless").
"""
from __future__ import annotations

import math

from ... import backend
from ...kernels.dispatch import make_dispatch_plan
from ..module import Module
from .dispatch import combine, permute
from .experts import Experts
from .routers import Routing, make_router


def _check_factor(name, value):
    if value is not None and not value > 0:
        raise ValueError(f"MoELayer: {name} must be > 0 or None (dropless), got {value}")


class MoELayer(Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2,
                 router: str = "topk", capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = 2.0, num_shared_experts: int = 0,
                 activation: str = "gelu", aux_loss_weight: float = 1e-2,
                 z_loss_weight: float = 1e-3, dispatch_impl: str | None = None, **router_kw):
        super().__init__()
        _check_factor("capacity_factor", capacity_factor)
        _check_factor("eval_capacity_factor", eval_capacity_factor)
        self.num_experts = num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.dispatch_impl = dispatch_impl
        self.gate = make_router(router, d_model, num_experts, top_k=top_k,
                                aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight,
                                **router_kw)
        self.experts = Experts(num_experts, d_model, d_ff, activation)
        # s shared experts of width f = one always-active expert of width s * f.
        self.shared_experts = (Experts(1, d_model, d_ff * num_shared_experts, activation)
                               if num_shared_experts else None)
        self.aux_loss = None
        self._stats = {}        # a dict, or a function that computes it (see last_stats)

    def capacity(self, num_tokens: int) -> int | None:
        """C = ceil(factor * T * k / E), with the training or the evaluation factor."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return math.ceil(factor * num_tokens * self.gate.top_k / self.num_experts)

    def forward(self, x):
        # x (..., d) -> (..., d)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                       # (T, d)
        T = flat.shape[0]
        capacity = self.capacity(T)
        routing = self.gate(flat, capacity)
        plan = make_dispatch_plan(routing.expert_index, self.num_experts,
                                  None if self.gate.uses_capacity_in_routing else capacity,
                                  impl=self.dispatch_impl)
        xs = permute(flat, plan, self.dispatch_impl)                          # (R, d)
        ys = self.experts(xs, plan.bounds)                                    # (R, d)
        out = combine(ys, routing.weights, plan, self.dispatch_impl)          # (T, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, (0, T))
        self.aux_loss = routing.aux_loss
        # Statistics are computed when read, not here: reading them waits for the GPU.
        probs = routing.probs.detach()
        self._stats = lambda: router_statistics(
            Routing(routing.expert_index, None, None, probs, None, routing.losses), plan, capacity)
        return out.reshape(*shape)

    @property
    def last_stats(self) -> dict:
        """Router statistics of the last forward (router_statistics), computed on first read."""
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats


def router_statistics(routing, plan, capacity) -> dict:
    """Tokens per expert, dropped fraction (of routed slots), fraction of tokens left with no
    expert at all, aux losses, router entropy: computed where the arrays live, then brought
    to the host in one transfer (plain Python numbers, for logs)."""
    xp = backend.array_module(routing.expert_index)
    p = routing.probs.data.astype(xp.float64)                                 # (T, E)
    E = p.shape[-1]
    losses = list(routing.losses.items())
    host = backend.to_numpy(xp.concatenate([
        plan.counts.astype(xp.float64),                                       # (E,) kept per expert
        xp.stack([
            (routing.expert_index >= 0).sum().astype(xp.float64),             # real slots
            (plan.slot_row < 0).all(axis=1).mean(),                           # unrouted tokens
            -(p * xp.log(xp.clip(p, 1e-30, None))).sum(axis=-1).mean(),       # entropy
            *[xp.asarray(v, dtype=xp.float64) for _, v in losses]]),
    ]))
    counts, (real, unrouted, entropy), loss_values = host[:E], host[E:E + 3], host[E + 3:]
    return {
        "tokens_per_expert": counts.astype(int).tolist(),
        "dropped_fraction": 1.0 - float(counts.sum()) / max(float(real), 1.0),
        "unrouted_fraction": float(unrouted),
        "capacity": capacity,
        "router_entropy": float(entropy),
        **{f"loss_{name}": float(v) for (name, _), v in zip(losses, loss_values)},
    }
