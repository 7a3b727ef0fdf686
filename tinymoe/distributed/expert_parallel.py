"""Expert parallelism: the experts of one MoE layer spread over the ranks.

With E experts and W ranks, rank r holds experts r*E/W .. (r+1)*E/W - 1. Every rank
routes its own tokens with the full gate, then

    route      expert_index, weights = gate(x)                 (local, as in MoELayer)
    dispatch   xs = permute(x, plan)      rows grouped by expert, hence by owner rank
    counts     all-to-all of the per-expert row counts         (each rank learns what comes)
    payload    all-to-all of xs           rows travel to the ranks owning their experts
    experts    the local experts on the rows they received     (from every rank)
    return     all-to-all back            each row goes home, in its original place
    combine    out[t] = sum_j weights[t, j] ys[slot (t, j)]

Every all-to-all is one `comm.all_to_all_rows` call on one buffer (counts included); the
payload ones are `AllToAll` Functions, so backward runs the same path in reverse.
With the same weights and inputs, each rank's output and gradients equal those of the
single-process MoELayer on that rank's tokens; the experts' gradients are the sums over
all ranks' tokens (see data_parallel.py for the 1/W of a mean loss).
"""
from __future__ import annotations

import math

import numpy as np

from tinymoe.backend import array_module, to_numpy
from tinymoe.kernels.dispatch import make_dispatch_plan
from tinymoe.nn.module import Module
from tinymoe.nn.moe.dispatch import combine, permute
from tinymoe.nn.moe.layer import router_statistics

from .all_to_all import all_to_all


def local_expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """[first, last) experts held by `rank`; E must be a multiple of the world size."""
    if num_experts % world_size:
        raise ValueError(f"expert parallelism: {num_experts} experts cannot be split evenly over {world_size} "
                         f"ranks; num_experts must be a multiple of the world size")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def source_to_expert_order(recv_counts: np.ndarray) -> np.ndarray:
    """The received rows come grouped by (source rank, local expert); the experts want them
    grouped by (local expert, source rank). recv_counts (W, E_local) -> row order (R,)."""
    W, E_local = recv_counts.shape
    starts = np.concatenate([[0], np.cumsum(recv_counts.ravel())[:-1]]).reshape(W, E_local)
    return np.concatenate([np.arange(starts[i, e], starts[i, e] + recv_counts[i, e])
                           for e in range(E_local) for i in range(W)] + [np.zeros(0, np.int64)]).astype(np.int64)


class ExpertParallelMoE(Module):
    """An MoELayer whose experts live on several ranks. Build it from a full MoELayer made
    with the same seed on every rank: it keeps the gate and shared experts, and only this
    rank's slice of the experts (the layer's modules are taken over, not copied).
    comm: the ranks the experts spread over; on a Mesh, its expert-parallel group."""

    def __init__(self, layer, comm=None):
        super().__init__()
        import tinymoe.distributed as dist
        from tinymoe.distributed.mesh import Mesh

        comm = comm if comm is not None else dist.get_world()
        self.comm = comm.ep if isinstance(comm, Mesh) else comm
        W, r = self.comm.world_size, self.comm.rank
        self.num_experts = layer.num_experts
        self.first, self.last = local_expert_range(layer.num_experts, W, r)
        self.capacity_factor, self.eval_capacity_factor = layer.capacity_factor, layer.eval_capacity_factor
        self.dispatch_impl = layer.dispatch_impl
        self.gate = layer.gate
        self.shared_experts = layer.shared_experts
        self.experts = layer.experts
        for name, p in self.experts.named_parameters():   # keep experts first..last-1 of (E, ...)
            p.data = p.data[self.first:self.last].copy()
            p.expert_parallel = True                       # data_parallel: no all-reduce for these
        self.experts.num_experts = self.last - self.first
        self.aux_loss = None
        self.last_stats = {}

    def capacity(self, num_tokens: int) -> int | None:
        """C = ceil(factor * T * k / E) over this rank's T tokens (GShard: a capacity per group)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if factor is None else math.ceil(factor * num_tokens * self.gate.top_k / self.num_experts)

    def forward(self, x):
        # x (..., d) -> (..., d)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                        # (T, d)
        T, W, E_local = flat.shape[0], self.comm.world_size, self.last - self.first
        capacity = self.capacity(T)                                            # per rank, as GShard's groups
        routing = self.gate(flat, capacity)
        plan = make_dispatch_plan(routing.expert_index, self.num_experts,
                                  None if self.gate.uses_capacity_in_routing else capacity,
                                  impl=self.dispatch_impl)
        xs = permute(flat, plan, self.dispatch_impl)                           # (R, d) grouped by expert

        # counts first: rows for each expert, sent to the expert's owner
        counts = to_numpy(plan.counts).astype(np.int64).reshape(W, E_local)    # (W, E_local)
        per_rank = [1] * W                                                     # one row of E_local counts per rank
        got = self.comm.all_to_all_rows(counts, per_rank, per_rank)            # (W, E_local), one buffer
        recv_counts = to_numpy(got).astype(np.int64)                           # (W, E_local)
        send_rows, recv_rows = counts.sum(1), recv_counts.sum(1)               # (W,), (W,)

        # then the payload: our rows to their experts' ranks, their rows to ours
        xr, _ = all_to_all(xs, send_rows, self.comm, recv_rows)                # (sum recv_rows, d)
        xp = array_module(xr.data)
        order = source_to_expert_order(recv_counts)                            # (source, e) -> (e, source)
        xl = xr[xp.asarray(order)] if W > 1 and E_local > 1 else xr
        offsets = np.concatenate([[0], np.cumsum(recv_counts.sum(0))]).astype(np.int64)  # (E_local+1,)
        yl = self.experts(xl, offsets)                                         # (sum recv_rows, d)
        yr = yl[xp.asarray(np.argsort(order))] if W > 1 and E_local > 1 else yl  # back to (source, e)
        ys, _ = all_to_all(yr, recv_rows, self.comm, send_rows)                # (R, d) home again

        out = combine(ys, routing.weights, plan, self.dispatch_impl)           # (T, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, array_module(flat.data).asarray([0, T]))
        self.aux_loss = routing.aux_loss
        self.last_stats = {**router_statistics(routing, plan, capacity),
                           "rows_sent": send_rows.tolist(), "rows_received": recv_rows.tolist(),
                           "bytes_sent": int((send_rows.sum() - send_rows[self.comm.rank]) * xs.shape[1]
                                             * xs.dtype.itemsize)}
        return out.reshape(*shape)


def shard_experts(model: Module, comm=None) -> Module:
    """Replace every MoELayer inside `model` by an ExpertParallelMoE holding this rank's
    experts (in place; returns the model). Build the model with the same seed on every rank."""
    from tinymoe.nn.moe import MoELayer

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoELayer):
                setattr(module, name, ExpertParallelMoE(child, comm))
    return model
