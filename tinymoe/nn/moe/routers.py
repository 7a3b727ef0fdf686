"""Routers: which experts each token goes to, and with which weights.

Every router maps x (T, d) to a `Routing`:
    expert_index (T, k) int array   expert of slot (t, j); -1 = empty slot (not dispatched)
    weights      (T, k) Tensor      gate value of each slot (differentiable)
    logits, probs (T, E) Tensors    the router's scores, for aux losses and statistics
    aux_loss     scalar Tensor      the weighted sum of this router's auxiliary losses
    losses       dict name -> 0-d array   the unweighted aux losses, for logging (left on
                                    the device: float() them when read, not every step)

The choice of experts is discrete (no gradient); the weights and aux losses carry the
gradient into the gate. Capacity (how many slots an expert keeps) is applied later by
the dispatch plan, except for expert choice where it *is* the routing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ... import backend
from ...dtypes import is_half
from ...autograd.ops import where
from .. import functional as F
from ..linear import Linear
from ..module import Module
from .balanced_assignment import balanced_assignment
from .losses import (importance_loss, load_balancing_loss, load_loss, normal_cdf, z_loss)


@dataclass
class Routing:
    expert_index: object          # (T, k) int array
    weights: object               # (T, k) Tensor
    logits: object                # (T, E) Tensor
    probs: object                 # (T, E) Tensor
    aux_loss: object = None       # scalar Tensor or None
    losses: dict = field(default_factory=dict)   # name -> 0-d array


class Router(Module):
    """Base: the gate is a linear map d -> E without bias (named `gate`, as in public MoEs)."""

    uses_capacity_in_routing = False

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1,
                 aux_loss_weight: float = 1e-2, z_loss_weight: float = 0.0):
        super().__init__()
        name = type(self).name
        if num_experts < 1:
            raise ValueError(f"router {name!r}: num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"router {name!r}: top_k={top_k} must be between 1 and "
                             f"num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.gate = Linear(d_model, num_experts, bias=False)

    @staticmethod
    def scores(linear, x):
        """x W^T (T, E), in float32 whatever the format of x and W: routing is a softmax over
        E logits and a discrete top-k of it, where bfloat16's 3 digits flip choices
        (Switch Transformer's "selective precision", Fedus et al. 2021, sec. 2.4)."""
        if is_half(x.dtype) or is_half(linear.weight.dtype):
            return F.linear(x.astype("float32"), linear.weight.astype("float32"))
        return linear(x)

    def _finish(self, expert_index, weights, logits, probs, losses, weights_of_losses):
        """Add the z-loss, weight the losses, build the Routing."""
        if self.z_loss_weight:
            losses["z"] = z_loss(logits)
            weights_of_losses["z"] = self.z_loss_weight
        aux = None
        for name, value in losses.items():
            term = value * weights_of_losses[name]
            aux = term if aux is None else aux + term
        values = {name: value.data for name, value in losses.items()}
        return Routing(expert_index, weights, logits, probs, aux, values)

    def extra_repr(self):
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


def _standard_normal(like):
    """N(0, 1) noise shaped like `like`: the GPU's counter-based generator on a CuPy array
    (capturable), the seeded NumPy generator otherwise."""
    if backend.is_cupy_array(like):
        from ...kernels import random
        return random.normal(like.shape, like.dtype)
    return backend.rng("cpu").standard_normal(like.shape).astype(like.dtype)


def _uniform(n, like):
    """n uniform numbers in [0, 1) on like's device (float64 on the CPU, as before)."""
    if backend.is_cupy_array(like):
        from ...kernels import random
        return random.uniform((n,), like.dtype)
    return backend.rng("cpu").random(n)


def _gather(probs, expert_index):
    """probs[t, expert_index[t, j]] as a (T, k) Tensor; empty slots read expert 0 (unused)."""
    xp = backend.array_module(expert_index)
    return F.gather(probs, 1, xp.where(expert_index >= 0, expert_index, 0))


class DenseRouter(Router):
    """Soft MoE of Jacobs et al. 1991: every expert, weighted by softmax(x W_g). k = E."""

    name = "dense"

    def __init__(self, d_model, num_experts, top_k=None, **kw):
        super().__init__(d_model, num_experts, num_experts, **kw)

    def forward(self, x, capacity=None):
        logits = self.scores(self.gate, x)                                                # (T, E)
        probs = F.softmax(logits, axis=-1)
        xp = backend.array_module(probs.data)
        T, E = probs.shape
        expert_index = xp.broadcast_to(xp.arange(E), (T, E)).copy()          # (T, E)
        return self._finish(expert_index, probs, logits, probs, {}, {})


class TopKRouter(Router):
    """G(x) = softmax(x W_g); keep the k largest gates (renormalized to sum 1 if asked).
    Aux: Switch load balancing E * sum_i f_i P_i."""

    name = "topk"

    def __init__(self, d_model, num_experts, top_k=2, normalize=True, **kw):
        super().__init__(d_model, num_experts, top_k, **kw)
        self.normalize = normalize

    def forward(self, x, capacity=None):
        logits = self.scores(self.gate, x)                                                # (T, E)
        probs = F.softmax(logits, axis=-1)
        weights, index = F.topk(probs, self.top_k, axis=-1)                  # (T, k) each
        if self.normalize and self.top_k > 1:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        expert_index = index.data
        losses = {"load_balance": load_balancing_loss(probs, expert_index, self.num_experts)}
        return self._finish(expert_index, weights, logits, probs, losses,
                            {"load_balance": self.aux_loss_weight})


class SwitchRouter(TopKRouter):
    """Switch Transformer (Fedus et al. 2021): top-1, output scaled by the gate p_i(x)
    (not renormalized: p_i is how the router gets its gradient)."""

    name = "switch"

    def __init__(self, d_model, num_experts, top_k=1, **kw):
        super().__init__(d_model, num_experts, 1, normalize=False, **kw)


class GShardRouter(Router):
    """GShard top-2 (Lepikhin et al. 2020, Alg. 1): g1, g2 = the two largest gates,
    normalized by g1 + g2; the second expert is used only with probability 2 * g2
    (in training; always in evaluation). Capacity overflow is dropped by the plan."""

    name = "gshard"

    def __init__(self, d_model, num_experts, top_k=2, **kw):
        if num_experts < 2:
            raise ValueError(f"router 'gshard': needs num_experts >= 2, got {num_experts}")
        super().__init__(d_model, num_experts, 2, **kw)

    def forward(self, x, capacity=None):
        logits = self.scores(self.gate, x)
        probs = F.softmax(logits, axis=-1)                                   # (T, E)
        top, index = F.topk(probs, 2, axis=-1)                               # (T, 2)
        weights = top / top.sum(axis=-1, keepdims=True)                      # g_j / (g1 + g2)
        expert_index = index.data.copy()
        if self.training:
            xp = backend.array_module(expert_index)
            u = _uniform(expert_index.shape[0], weights.data)                # (T,)
            drop = u >= 2 * weights.data[:, 1]                               # keep w.p. 2 g2
            expert_index[:, 1] = xp.where(drop, -1, expert_index[:, 1])
        # f_i counts first choices only (GShard's c_e / S).
        losses = {"load_balance": load_balancing_loss(probs, expert_index[:, :1], self.num_experts)}
        return self._finish(expert_index, weights, logits, probs, losses,
                            {"load_balance": self.aux_loss_weight})


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5):
        H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i)      (noise in training only)
        G(x) = softmax(KeepTopK(H(x), k))
    Aux: importance loss (eq. 6-7) and the smooth load loss (eq. 8-10), each CV^2."""

    name = "noisy-topk"

    def __init__(self, d_model, num_experts, top_k=2, **kw):
        super().__init__(d_model, num_experts, top_k, **kw)
        self.noise = Linear(d_model, num_experts, bias=False)
        self.noise.weight.data[...] = 0                                      # start with unit noise scale

    def forward(self, x, capacity=None):
        clean = self.scores(self.gate, x)                                                 # (T, E)  x W_g
        k, E = self.top_k, self.num_experts
        noisy = self.training and k < E
        if noisy:
            std = F.softplus(self.scores(self.noise, x))                                  # (T, E)
            H = clean + _standard_normal(clean.data) * std                   # eq. 4
        else:
            H = clean
        top = F.topk(H, min(k + 1, E), axis=-1)                              # values (T, k[+1]), sorted
        values, index = top[0], top[1].data
        weights = F.softmax(values[:, :k], axis=-1)                          # eq. 3-5: softmax of kept
        expert_index = index[:, :k]
        xp = backend.array_module(expert_index)
        # Dense gates G(x) (T, E) for the importance loss: weights at their experts, 0 elsewhere.
        gates = F.scatter_add(xp.zeros(clean.shape, clean.dtype), 1, expert_index, weights)
        losses = {"importance": importance_loss(gates)}
        if noisy:
            # P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i)   (eq. 9)
            in_topk = xp.zeros(clean.shape, dtype=bool)
            xp.put_along_axis(in_topk, expert_index, True, axis=1)
            threshold = where(in_topk, values[:, k:k + 1], values[:, k - 1:k])  # (T, E)
            losses["load"] = load_loss(normal_cdf((clean - threshold) / std))
        weights_of_losses = {"importance": self.aux_loss_weight, "load": self.aux_loss_weight}
        probs = F.softmax(clean, axis=-1)
        return self._finish(expert_index, weights, clean, probs, losses, weights_of_losses)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): S = softmax(x W_g) (T, E); each expert takes its
    top-C tokens by S[:, e], C = capacity (default T k / E). A token may get 0..E experts;
    balance is perfect by construction, so there is no aux loss. Note: an expert's choice
    looks at every token of the batch, including later positions of a sequence."""

    name = "expert-choice"
    uses_capacity_in_routing = True

    def forward(self, x, capacity=None):
        logits = self.scores(self.gate, x)
        probs = F.softmax(logits, axis=-1)                                   # (T, E)
        T, E = probs.shape
        C = capacity if capacity is not None else max(T * self.top_k // E, 1)
        C = max(min(C, T), 1)
        xp = backend.array_module(probs.data)
        chosen = xp.argsort(-probs.data, axis=0, kind="stable")[:C]          # (C, E) tokens per expert
        expert_index = xp.full((T, E), -1, dtype=xp.int64)                   # slot (t, e)
        xp.put_along_axis(expert_index, chosen, xp.arange(E)[None, :].repeat(C, 0), axis=0)
        return self._finish(expert_index, probs, logits, probs, {}, {})


class BaseRouter(Router):
    """BASE layers (Lewis et al. 2021): in training, the balanced assignment that maximizes
    sum_t h_t . w_{a(t)} (solved exactly, see balanced_assignment.py); in evaluation, each
    token's best expert (greedy, as in the paper). The expert output is scaled by
    sigma(h_t . w_e), eq. 1: out = sigma(h . w_e) f_e(h) + h, where the + h is the
    transformer block's residual connection. No aux loss: balance is a constraint."""

    name = "base"

    def __init__(self, d_model, num_experts, top_k=1, **kw):
        super().__init__(d_model, num_experts, 1, **kw)

    def forward(self, x, capacity=None):
        logits = self.scores(self.gate, x)                                                # (T, E)  h_t . w_e
        xp = backend.array_module(logits.data)
        if self.training:
            expert = xp.asarray(balanced_assignment(backend.to_numpy(logits.data)))
        else:
            expert = logits.data.argmax(axis=-1)
        expert_index = expert.astype(xp.int64)[:, None]                      # (T, 1)
        weights = F.sigmoid(F.gather(logits, 1, expert_index))               # sigma(h . w_e)
        return self._finish(expert_index, weights, logits, F.softmax(logits, axis=-1), {}, {})


ROUTERS = {cls.name: cls for cls in (DenseRouter, TopKRouter, SwitchRouter, GShardRouter,
                                     NoisyTopKRouter, ExpertChoiceRouter, BaseRouter)}


def make_router(name: str, d_model: int, num_experts: int, top_k: int = 2, **kw) -> Router:
    """A router by name: one of ROUTERS ("dense", "topk", "switch", "gshard", "noisy-topk",
    "expert-choice", "base")."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(ROUTERS)}")
    return ROUTERS[name](d_model, num_experts, top_k=top_k, **kw)
