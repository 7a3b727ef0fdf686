"""The one-hot einsum form of dispatch/combine (GShard, Mesh-TensorFlow), for comparison.

    dispatch (T, E, C) one-hot:   expert inputs  X_e = einsum("tec,td->ecd", dispatch, x)
    combine  (T, E, C) weights:   output         y   = einsum("tec,ecd->td", combine, Y_e)

It is simple to write and shards well on TPUs, but both masks take O(T E C) memory,
which grows with the square of the tokens at a fixed capacity factor; MoELayer uses
the permutation form (O(T k d)) instead. This function gives the same output and is
tested equal to it.
"""
from __future__ import annotations

from ... import backend
from .. import functional as F


def moe_einsum(x, routing, plan, experts):
    """x (T, d), a Routing, its DispatchPlan, an Experts module -> (T, d)."""
    xp = backend.array_module(x.data)
    T, d = x.shape
    E = plan.num_experts
    C = max(int(plan.counts.max()), 1)
    expert = xp.where(routing.expert_index >= 0, routing.expert_index, 0)     # (T, k)
    kept = plan.slot_row >= 0
    position = plan.slot_row - plan.offsets[expert]                           # row within expert
    column = xp.where(kept, expert * C + position, 0)                         # (T, k) in [0, E*C)
    dispatch = xp.zeros((T, E * C), dtype=x.dtype)                            # (T, E*C) one-hot
    rows = xp.broadcast_to(xp.arange(T)[:, None], column.shape)
    dispatch[rows[kept], column[kept]] = 1
    combine_w = F.scatter_add(xp.zeros((T, E * C), x.dtype), 1, column,
                              routing.weights * kept.astype(x.dtype))         # (T, E*C)

    xe = (dispatch.T @ x).reshape(E, C, d)                                    # "tec,td->ecd"
    h = xe @ experts.w1                                                       # (E, C, f)
    if experts.activation == "swiglu":
        h = F.silu(h) * (xe @ experts.w3)
    else:
        h = F.gelu(h) if experts.activation == "gelu" else F.relu(h)
    ye = (h @ experts.w2).reshape(E * C, d)                                   # (E*C, d)
    return combine_w @ ye                                                     # "tec,ecd->td"
