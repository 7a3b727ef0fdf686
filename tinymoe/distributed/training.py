"""Training on W ranks: what `tinymoe.train` adds under expert + data parallelism.

    python -m tinymoe.distributed.launch --nproc 4 examples/train_moe_gpt.py --expert-parallel
    mpiexec -n 2 python examples/train_moe_gpt.py --expert-parallel --backend mpi
    python -m tinymoe.distributed.launch --nproc 8 -m tinymoe train --expert-parallel --ep-size 4

The W ranks form a mesh of ep_size x dp_size (mesh.py; ep_size = W unless given). Every
rank builds the same model and optimizer (same seed), then

    shard      each MoE layer keeps experts e E/ep .. (e+1) E/ep - 1 of its EP group (ExpertParallelMoE)
    broadcast  rank 0's shared (non-expert) parameters go to every rank, and each DP group's
               first rank's experts to the group (the replicas of those experts)

and every step

    data       every rank draws the same global batch (B, L) and keeps rows r B/W .. (r+1) B/W - 1
    forward    tokens travel to their experts' ranks and back (all-to-alls within the EP group)
    backward   shared gradients: all-reduce over all W ranks, mean  g = (1/W) sum_r dL_r/dtheta
               expert gradients: the reverse all-to-all summed the EP group's; all-reduce (sum)
               over the DP group, times 1/W
    clip       by the norm of the whole model's gradient (shared + the EP group's experts)
    step       AdamW on this rank's parameters; the shared ones stay identical on all ranks,
               the experts on the ranks of a DP group

Evaluations are collective (a forward needs every rank: the experts are spread out);
checkpoints gather the experts into one full model, the same file one process writes, which
loads onto any mesh shape (`--resume` slices it again). Rank 0 alone prints and writes files.

With a dropless capacity and no load-balancing loss, W ranks compute the loss and the
gradients of one process on the global batch, up to float rounding. With a capacity or
an aux loss, each rank's B/W rows are one routing group (as GShard's groups): the same
as one process accumulating gradients over W micro-batches.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import numpy as np

from tinymoe.backend import array_module, to_numpy
from tinymoe.distributed.data_parallel import broadcast_parameters, checksum
from tinymoe.distributed.expert_parallel import ExpertParallelMoE, shard_experts
from tinymoe.distributed.mesh import as_mesh


def expert_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def check_batch_size(batch_size: int, comm) -> None:
    if batch_size % comm.world_size:
        raise ValueError(f"expert parallelism: batch_size={batch_size} cannot be split evenly over "
                         f"{comm.world_size} ranks; use a multiple of {comm.world_size}")


def local_rows(x, comm):
    """Rank r's rows of the global batch: x (B, ...) -> x[r B/W : (r+1) B/W]  (B/W, ...)."""
    check_batch_size(x.shape[0], comm)
    n = x.shape[0] // comm.world_size
    return x[comm.rank * n:(comm.rank + 1) * n]


def setup(model, optimizer, comm):
    """Shard the experts of `model` over the EP group, in place, and give every rank rank 0's
    shared parameters (and its DP group's first rank's experts). comm: the world's communicator
    or a Mesh. The optimizer must be built before (on the full model: its parameter order is
    then the single-process one, so checkpoints match); moments already loaded from a
    checkpoint are sliced like their experts. optimizer None: one built after (ZeRO's, on
    the shards). Returns the model."""
    mesh = as_mesh(comm)
    shard_experts(model, mesh.ep)
    for layer in expert_layers(model):
        for p in layer.experts.parameters():
            state = optimizer.state.get(id(p), {}) if optimizer is not None else {}
            for key, value in state.items():
                if hasattr(value, "shape"):
                    state[key] = value[layer.first:layer.last].copy()   # (E, ...) -> (E/ep, ...)
            if mesh.dp_size > 1:
                p.data[...] = mesh.dp.broadcast(p.data, root=0)           # the replicas start equal
    broadcast_parameters(model.parameters(), mesh.world)
    return model


def gather_experts(array, first: int, last: int, num_experts: int, comm):
    """Rank r's experts first..last-1 of an (E, ...) array -> all E experts, on every rank of
    `comm` (the EP group: it holds each expert once). Each rank writes its rows into zeros;
    the sum over ranks is the whole (x + 0 = x, exact)."""
    full = array_module(array).zeros((num_experts, *array.shape[1:]), array.dtype)   # (E, ...)
    full[first:last] = array
    return comm.all_reduce(full, op="sum")


@contextmanager
def full_experts(model, optimizer, comm):
    """Inside the block, every expert parameter and its optimizer moments hold all E experts,
    as in the single-process model (to save a checkpoint). Collective: all ranks enter it;
    each EP group gathers its own experts (comm: the world's communicator or a Mesh)."""
    group = as_mesh(comm).ep
    saved = []   # (parameter, its shard, its optimizer state, the state's shards)
    for layer in expert_layers(model):
        for p in layer.experts.parameters():
            state = optimizer.state.get(id(p), {}) if optimizer is not None else {}
            # sorted: the gathers are collectives, so every rank must take the keys in one order
            # (a state loaded from a checkpoint comes in the file reader's hash order)
            shards = {k: state[k] for k in sorted(state) if hasattr(state[k], "shape")}
            saved.append((p, p.data, state, shards))
            p.data = gather_experts(p.data, layer.first, layer.last, layer.num_experts, group)
            for key, value in shards.items():
                state[key] = gather_experts(value, layer.first, layer.last, layer.num_experts, group)
    try:
        yield model
    finally:
        for p, data, state, shards in saved:
            p.data = data
            state.update(shards)


def check_in_sync(model, comm) -> str:
    """SHA-256 of this rank's shared parameters; raises unless every rank has rank 0's, and
    (on a mesh) unless the ranks of each DP group hold the same experts."""
    mesh = as_mesh(comm)
    mine = checksum(model.parameters())
    if not _same_everywhere(mine, mesh.world):
        raise RuntimeError(f"expert parallelism: the ranks' shared parameters differ (rank {mesh.rank}: "
                           f"{mine[:12]}); the data-parallel gradients went out of step")
    if mesh.dp_size > 1 and not _same_everywhere(expert_checksum(model), mesh.dp):
        raise RuntimeError(f"expert parallelism: the replicas of rank {mesh.rank}'s experts differ across its "
                           f"data-parallel group; their gradients went out of step")
    return mine


def expert_checksum(model) -> str:
    """SHA-256 of this rank's expert parameters (equal across a DP group's ranks)."""
    h = hashlib.sha256()
    for layer in expert_layers(model):
        for p in layer.experts.parameters():
            h.update(to_numpy(p.data).tobytes())
    return h.hexdigest()


def _same_everywhere(digest: str, comm) -> bool:
    """Whether every rank of comm has its rank 0's hex digest (one broadcast, one all-reduce)."""
    root = bytes(to_numpy(comm.broadcast(np.frombuffer(digest.encode(), np.uint8).copy(), root=0))).decode()
    return float(to_numpy(comm.all_reduce(np.array([float(digest == root)]), op="min"))[0]) == 1.0


def step_stats(model, loss, comm) -> dict:
    """The last step's numbers for the log, over all ranks: losses and dropped fraction
    averaged (every rank has B/W rows), tokens per expert summed."""
    layers = model.stats()
    mean = np.array([model.last_ce, float(loss.item())]
                    + [s["dropped_fraction"] for s in layers.values()], np.float64)
    mean = to_numpy(comm.all_reduce(mean, op="mean"))
    out = {"loss": float(mean[0]), "total_loss": float(mean[1])}
    if layers:
        counts = np.array([s["tokens_per_expert"] for s in layers.values()], np.float64)   # (layers, E)
        counts = to_numpy(comm.all_reduce(counts, op="sum"))
        out["expert_load"] = {name: (c / max(c.sum(), 1)).round(4).tolist() for name, c in zip(layers, counts)}
        out["dropped_fraction"] = float(mean[2:].mean())
    return out
