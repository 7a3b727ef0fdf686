"""Training on W ranks: what `tinymoe.train` adds under expert + data parallelism.

    python -m tinymoe.distributed.launch --nproc 4 examples/train_moe_gpt.py --expert-parallel
    mpiexec -n 2 python examples/train_moe_gpt.py --expert-parallel --backend mpi

Every rank builds the same model and optimizer (same seed), then

    shard      each MoE layer keeps its experts r E/W .. (r+1) E/W - 1   (ExpertParallelMoE)
    broadcast  rank 0's shared (non-expert) parameters go to every rank

and every step

    data       every rank draws the same global batch (B, L) and keeps rows r B/W .. (r+1) B/W - 1
    forward    tokens travel to their experts' ranks and back (all-to-alls)
    backward   shared gradients: all-reduce, mean  g = (1/W) sum_r dL_r/dtheta
               expert gradients: the reverse all-to-all already summed them, times 1/W
    clip       by the norm of the whole model's gradient (shared + every rank's experts)
    step       AdamW on this rank's parameters; the shared ones stay identical on all ranks

Evaluations are collective (a forward needs every rank: the experts are spread out);
checkpoints gather the experts into one full model, the same file one process writes.
Rank 0 alone prints and writes files.

With a dropless capacity and no load-balancing loss, W ranks compute the loss and the
gradients of one process on the global batch, up to float rounding. With a capacity or
an aux loss, each rank's B/W rows are one routing group (as GShard's groups): the same
as one process accumulating gradients over W micro-batches.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from tinymoe.backend import array_module, to_numpy
from tinymoe.distributed.data_parallel import broadcast_parameters, checksum
from tinymoe.distributed.expert_parallel import ExpertParallelMoE, shard_experts


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
    """Shard the experts of `model` over the ranks, in place, and give every rank rank 0's
    shared parameters. The optimizer must be built before (on the full model: its parameter
    order is then the single-process one, so checkpoints match); moments already loaded
    from a checkpoint are sliced like their experts. Returns the model."""
    shard_experts(model, comm)
    for layer in expert_layers(model):
        for p in layer.experts.parameters():
            state = optimizer.state.get(id(p), {})
            for key, value in state.items():
                if hasattr(value, "shape"):
                    state[key] = value[layer.first:layer.last].copy()   # (E, ...) -> (E/W, ...)
    broadcast_parameters(model.parameters(), comm)
    return model


def gather_experts(array, first: int, last: int, num_experts: int, comm):
    """Rank r's experts first..last-1 of an (E, ...) array -> all E experts, on every rank.
    Each rank writes its rows into zeros; the sum over ranks is the whole (x + 0 = x, exact)."""
    full = array_module(array).zeros((num_experts, *array.shape[1:]), array.dtype)   # (E, ...)
    full[first:last] = array
    return comm.all_reduce(full, op="sum")


@contextmanager
def full_experts(model, optimizer, comm):
    """Inside the block, every expert parameter and its optimizer moments hold all E experts,
    as in the single-process model (to save a checkpoint). Collective: all ranks enter it."""
    saved = []   # (parameter, its shard, its optimizer state, the state's shards)
    for layer in expert_layers(model):
        for p in layer.experts.parameters():
            state = optimizer.state.get(id(p), {}) if optimizer is not None else {}
            # sorted: the gathers are collectives, so every rank must take the keys in one order
            # (a state loaded from a checkpoint comes in the file reader's hash order)
            shards = {k: state[k] for k in sorted(state) if hasattr(state[k], "shape")}
            saved.append((p, p.data, state, shards))
            p.data = gather_experts(p.data, layer.first, layer.last, layer.num_experts, comm)
            for key, value in shards.items():
                state[key] = gather_experts(value, layer.first, layer.last, layer.num_experts, comm)
    try:
        yield model
    finally:
        for p, data, state, shards in saved:
            p.data = data
            state.update(shards)


def check_in_sync(model, comm) -> str:
    """SHA-256 of this rank's shared parameters; raises unless every rank has rank 0's."""
    mine = checksum(model.parameters())
    root = bytes(to_numpy(comm.broadcast(np.frombuffer(mine.encode(), np.uint8).copy(), root=0))).decode()
    same = float(to_numpy(comm.all_reduce(np.array([float(mine == root)]), op="min"))[0])
    if same != 1.0:
        raise RuntimeError(f"expert parallelism: the ranks' shared parameters differ (rank {comm.rank}: "
                           f"{mine[:12]}, rank 0: {root[:12]}); the data-parallel gradients went out of step")
    return mine


def rank0_says(flag: bool, comm) -> bool:
    """Rank 0's flag, on every rank: decisions that change the number of collectives (stop
    at the time limit) must be taken by one clock."""
    return bool(to_numpy(comm.broadcast(np.array([flag], np.int8), root=0))[0])


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
