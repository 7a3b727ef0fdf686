"""Data parallelism: every rank holds the same parameters and sees different data.

After backward, rank r holds the gradient of its own loss L_r. The step must follow
the gradient of the global loss L = mean_r L_r, so

    g = (1/W) sum_r dL_r/dtheta          (all_reduce, op="mean")

and every rank takes the same step from the same parameters: they stay identical.

Expert-parallel parameters are different: each rank of an EP group holds *other* experts,
and the reverse all-to-all already summed the EP group's contributions into the owner's
gradient, sum_{r in EP group} dL_r/dtheta_e. On a mesh (mesh.py) the same experts live once
per EP group, on the ranks of one DP group: they are summed over that DP group (nothing to
sum with dp_size = 1, plain expert parallelism), then get the same 1/W.

All gradients of one kind travel in one flat buffer (one "bucket"): one all-reduce instead
of one per parameter, as PyTorch's DistributedDataParallel does.
"""
from __future__ import annotations

import hashlib

import numpy as np

from tinymoe.backend import array_module, to_numpy


def is_expert_parallel(p) -> bool:
    """True for parameters sharded by expert parallelism (set by ExpertParallelMoE)."""
    return getattr(p, "expert_parallel", False)


def all_reduce_gradients(parameters, comm=None) -> None:
    """Turn each rank's local gradients into the gradient of the mean loss over ranks, in place.
    comm: the world's communicator or a Mesh. A missing gradient (None) counts as zero, so
    ranks stay in step."""
    import tinymoe.distributed as dist
    from tinymoe.distributed.mesh import as_mesh

    mesh = as_mesh(comm if comm is not None else dist.get_world())
    params = [p for p in parameters if p.requires_grad]
    experts = [p for p in params if is_expert_parallel(p)]
    if experts and mesh.dp_size > 1:
        _all_reduce_bucket(experts, mesh.dp, "sum")               # sum over the replicas of my experts
    for p in experts:
        if p.grad is not None:
            p.grad = p.grad / mesh.world_size                     # (1/W) sum_r dL_r/dtheta_e
    shared = [p for p in params if not is_expert_parallel(p)]
    if shared:
        _all_reduce_bucket(shared, mesh.world, "mean")            # (1/W) sum_r g_r


def _all_reduce_bucket(params, comm, op) -> None:
    """The parameters' gradients in one flat buffer, all-reduced, and back into .grad."""
    xp = array_module(params[0].data)
    bucket = xp.concatenate([(p.grad if p.grad is not None else xp.zeros_like(p.data)).ravel()
                             for p in params])                    # one flat buffer
    bucket = comm.all_reduce(bucket, op=op)
    start = 0
    for p in params:
        p.grad = bucket[start:start + p.data.size].reshape(p.data.shape).astype(p.data.dtype, copy=False)
        start += p.data.size


def broadcast_parameters(parameters, comm=None, root: int = 0) -> None:
    """Copy root's values of the (non-expert) parameters to every rank, so all start equal."""
    import tinymoe.distributed as dist

    comm = comm if comm is not None else dist.get_world()
    for p in parameters:
        if not is_expert_parallel(p):
            p.data[...] = comm.broadcast(p.data, root=root)


def checksum(parameters) -> str:
    """SHA-256 of the (non-expert) parameters' bytes: equal on two ranks iff their values are identical."""
    h = hashlib.sha256()
    for p in parameters:
        if not is_expert_parallel(p):
            h.update(to_numpy(p.data).tobytes())
    return h.hexdigest()


def global_grad_norm(parameters, comm):
    """||g|| of the WHOLE model (shared + every rank's experts), as a 0-d array on the device,
    the same on every rank: ||g||^2 = ||g_shared||^2 + sum over the EP group of
    ||g_experts of r||^2, the gradients already all-reduced (each EP group holds every expert
    once). comm: the world's communicator or a Mesh. One all-reduce of one number; no host read."""
    from tinymoe.distributed.mesh import as_mesh

    comm = as_mesh(comm).ep
    params = [p for p in parameters if p.grad is not None]
    xp = array_module(params[0].grad)
    zero = xp.zeros((), params[0].grad.dtype)
    shared = sum((xp.vdot(p.grad.ravel(), p.grad.ravel()) for p in params if not is_expert_parallel(p)), zero)
    mine = sum((xp.vdot(p.grad.ravel(), p.grad.ravel()) for p in params if is_expert_parallel(p)), zero)
    experts = comm.all_reduce(xp.reshape(xp.asarray(mine), (1,)), op="sum")[0]
    return xp.sqrt(shared + experts)


def clip_grad_norm_(parameters, max_norm: float, comm=None) -> float:
    """Clip by the norm of the WHOLE model's gradient, the same on every rank.

    After all_reduce_gradients the shared gradients are equal on all ranks, and each EP group
    holds every expert once (its DP replicas hold the same gradients):
    ||g||^2 = ||g_shared||^2 + sum over the EP group of ||g_experts of r||^2. Clipping by a
    local norm would scale the shared gradients differently on each rank, and the ranks would
    drift apart; summing over the whole world would count each expert dp_size times.
    comm: the world's communicator or a Mesh. Returns the norm before clipping."""
    import tinymoe.distributed as dist
    from tinymoe.distributed.mesh import as_mesh

    mesh = as_mesh(comm if comm is not None else dist.get_world())
    params = [p for p in parameters if p.grad is not None]
    shared = sum(float((p.grad.astype("float64") ** 2).sum()) for p in params if not is_expert_parallel(p))
    mine = sum(float((p.grad.astype("float64") ** 2).sum()) for p in params if is_expert_parallel(p))
    experts = float(to_numpy(mesh.ep.all_reduce(np.array([mine]), op="sum"))[0])
    norm = (shared + experts) ** 0.5
    if norm > max_norm:
        for p in params:
            p.grad = p.grad * (max_norm / (norm + 1e-6))
    return norm
