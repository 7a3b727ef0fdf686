"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

    y(x) = sum_{j < k} g_j(x) f_{e_j(x)}(x)  [+ sum_s f^shared_s(x)]

(Shazeer et al. 2017, eq. 1, with DeepSeekMoE's always-active shared experts.) Each
expert e keeps at most  C = ceil(capacity_factor * T * k / E)  slots (GShard, Switch);
the overflow is dropped, and a dropped token's MoE output is 0, so it goes on through
the residual connection only. capacity_factor=None routes every slot ("dropless").

Static dispatch (static_dispatch=True): no shape depends on the routing and nothing is read
on the host, so the layer can be captured in a CUDA graph (kernels/dispatch ::
make_static_plan). With a capacity every expert gets exactly C rows, padding included; the
same slots are kept as with the dynamic plan, and the padding is counted in the statistics
("padding_fraction"). Dropless, the plan has T*k rows (every slot) and the experts' row
bounds stay on the device, where the grouped kernels read them (kernels/grouped_gemm.py:
16-bit experts; otherwise the bounds are fetched once, as the dynamic plan does).
static_dispatch=None picks it on a GPU whenever it saves the host read: with a capacity, or
dropless with experts that read their bounds on the device (Experts.reads_bounds_on_device).
"""
from __future__ import annotations

import math

from ... import backend
from ...kernels.dispatch import make_dispatch_plan, make_static_plan
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
                 z_loss_weight: float = 1e-3, dispatch_impl: str | None = None,
                 static_dispatch: bool | None = None, **router_kw):
        super().__init__()
        _check_factor("capacity_factor", capacity_factor)
        _check_factor("eval_capacity_factor", eval_capacity_factor)
        self.num_experts = num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.dispatch_impl, self.static_dispatch = dispatch_impl, static_dispatch
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
        static = self.static_dispatch
        if static is None:
            static = backend.is_cupy_array(flat.data) and (
                capacity is not None or self.experts.reads_bounds_on_device(flat.dtype))
        if static:
            plan = make_static_plan(routing.expert_index, self.num_experts,
                                    None if capacity is None else max(capacity, 1),
                                    impl=self.dispatch_impl)
        else:
            plan = make_dispatch_plan(routing.expert_index, self.num_experts,
                                      None if self.gate.uses_capacity_in_routing else capacity,
                                      impl=self.dispatch_impl)
        xs = permute(flat, plan, self.dispatch_impl)                          # (R, d)
        ys = self.experts(xs, plan.offsets if plan.bounds is None else plan.bounds)   # (R, d)
        out = combine(ys, routing.weights, plan, self.dispatch_impl)          # (T, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, (0, T))
        self.aux_loss = routing.aux_loss
        # Statistics are computed when read, not here: reading them waits for the GPU. While
        # a CUDA graph is captured they are computed here, on the device, into arrays that
        # every replay refills, and read from those arrays each time (nothing is cached).
        probs = routing.probs.detach()
        stats_routing = Routing(routing.expert_index, None, None, probs, None, routing.losses)
        if backend.is_capturing():
            vector = router_stat_vector(stats_routing, plan)
            names = list(routing.losses)
            self._stats = _Live(lambda: stats_from_vector(backend.to_numpy(vector), self.num_experts,
                                                          names, capacity))
        else:
            self._stats = lambda: router_statistics(stats_routing, plan, capacity)
        return out.reshape(*shape)

    @property
    def last_stats(self) -> dict:
        """Router statistics of the last forward (router_statistics), computed on first read."""
        if isinstance(self._stats, _Live):
            return self._stats.read()
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats


class _Live:
    """Statistics of a captured step: read anew from the device at every read."""

    def __init__(self, read):
        self.read = read


def router_stat_vector(routing, plan):
    """The statistics as one float64 device array (E + 4 + losses,): kept per expert, real
    slots, unrouted tokens, entropy, padding rows, the unweighted aux losses. No host read."""
    xp = backend.array_module(routing.expert_index)
    p = routing.probs.data.astype(xp.float64)                                 # (T, E)
    return xp.concatenate([
        plan.counts.astype(xp.float64),                                       # (E,) kept per expert
        xp.stack([
            (routing.expert_index >= 0).sum().astype(xp.float64),             # real slots
            (plan.slot_row < 0).all(axis=1).mean(),                           # unrouted tokens
            -(p * xp.log(xp.clip(p, 1e-30, None))).sum(axis=-1).mean(),       # entropy
            xp.asarray(plan.padding_rows, dtype=xp.float64),                  # padding rows
            *[xp.asarray(v, dtype=xp.float64) for v in routing.losses.values()]]),
    ])


def stats_from_vector(host, num_experts, loss_names, capacity) -> dict:
    """router_stat_vector's numbers (on the host) as the log's dict."""
    E = num_experts
    counts, (real, unrouted, entropy, padding), loss_values = host[:E], host[E:E + 4], host[E + 4:]
    rows = float(counts.sum()) + float(padding)
    return {
        "tokens_per_expert": counts.astype(int).tolist(),
        "dropped_fraction": 1.0 - float(counts.sum()) / max(float(real), 1.0),
        "unrouted_fraction": float(unrouted),
        "capacity": capacity,
        "padding_fraction": float(padding) / max(rows, 1.0),                  # static plans' waste
        "router_entropy": float(entropy),
        **{f"loss_{name}": float(v) for name, v in zip(loss_names, loss_values)},
    }


def router_statistics(routing, plan, capacity) -> dict:
    """Tokens per expert, dropped fraction (of routed slots), fraction of tokens left with no
    expert at all, padding fraction (rows of a static plan that carry no slot), aux losses,
    router entropy: computed where the arrays live, then brought to the host in one transfer
    (plain Python numbers, for logs)."""
    host = backend.to_numpy(router_stat_vector(routing, plan))
    return stats_from_vector(host, plan.num_experts, list(routing.losses), capacity)
