"""ZeRO stage 1 (Rajbhandari et al. 2020): AdamW's states partitioned over data-parallel ranks.

Plain data parallelism keeps on every one of W ranks the parameters, their gradients and
AdamW's m and v: with float32 everywhere 4 + 4 + 8 = 16 bytes per parameter, W times over.
The optimizer states are the largest part and every rank computes the same update from
them. ZeRO-1 gives each rank the states of 1/W of the parameters only:

    flatten       theta = all parameters in one vector of P entries; rank r owns the slice
                  S_r = [r P / W, (r + 1) P / W)
    all-reduce    g = (1/W) sum_r g_r                        (as plain data parallelism)
    update        AdamW on theta[S_r] with g[S_r] and this rank's m, v  (P / W entries each)
    all-gather    every rank gets every updated slice back

so each rank holds 4 + 4 + 8 / W bytes per parameter (the lecture's P_os column;
`tinymoe/accounting/memory.py :: model_state_bytes(zero_stage=1)` gives the figures), and
the parameters stay bit-identical on all ranks. ZeRO-2 would reduce-scatter the gradients
instead of all-reducing them, keeping only g[S_r]; ZeRO-3 would partition the parameters
too. Here the all-gather is an all-reduce of a buffer that is zero outside the rank's
slice (x + 0 = x: exact), since the communicators offer all_reduce, not all_gather.

Parameter groups (e.g. weight decay on matrices only, as the trainer's AdamW) are flattened
group by group: each group is one vector, sliced the same way, with its own settings.

On an expert x data parallel mesh (mesh.py) a parameter's states are split over the ranks that
hold it: the dense ones over the whole world, each rank's experts over its DP group (the
replicas of those experts). `MeshZeroAdamW` is the two together; the mesh's gradient
all-reduce and global-norm clipping run before its step (reduce_gradients=False).
"""
from __future__ import annotations

from tinymoe.backend import array_module
from tinymoe.distributed.data_parallel import is_expert_parallel
from tinymoe.nn.parameter import Parameter
from tinymoe.optim import AdamW, Optimizer


def _as_groups(params) -> list[dict]:
    """A parameter list or a list of groups -> a list of groups (dicts with "params")."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    return [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]


class ZeroAdamW:
    """AdamW over data-parallel ranks with the states partitioned (ZeRO-1). Collective:
    every rank of `comm` builds it with the same parameters (in the same order) and calls step().

    reduce_gradients: True, the step averages the ranks' gradients itself; False, they already
    are the mean-loss gradients, equal on every rank of comm (the mesh's all-reduce ran, and
    clipping after it), and the ranks of comm may hold expert-parallel parameters: the same
    experts (a DP group of the mesh)."""

    def __init__(self, params, comm, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, reduce_gradients: bool = True):
        self.groups = [g for g in _as_groups(params) if g["params"]]
        self.params = [p for g in self.groups for p in g["params"]]
        if not self.params:
            raise ValueError("ZeroAdamW: got no parameters that require gradients")
        sharded = [i for i, p in enumerate(self.params) if is_expert_parallel(p)]
        if sharded and reduce_gradients:
            raise ValueError(f"ZeroAdamW: parameters {sharded} are expert-parallel (each rank holds its "
                             "own); give them to a plain AdamW and ZeroAdamW the shared ones (or, on a mesh, "
                             "MeshZeroAdamW)")
        self.comm, self.reduce_gradients = comm, reduce_gradients
        self.slices, shards = [], []   # per group: S_r = [lo, hi) of its flat vector; the shard Parameter
        for g in self.groups:
            total = sum(p.data.size for p in g["params"])                  # P of this group
            lo, hi = comm.rank * total // comm.world_size, (comm.rank + 1) * total // comm.world_size
            self.slices.append((lo, hi))
            shards.append(Parameter(self._flat([p.data for p in g["params"]])[lo:hi].copy()))
        self.total = sum(p.data.size for p in self.params)
        self.shards = shards
        self.inner = AdamW([dict({k: v for k, v in g.items() if k != "params"}, params=[s])
                            for g, s in zip(self.groups, shards)],
                           lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self):
        """The inner AdamW's groups (one per group given): a learning-rate schedule sets group["lr"] here."""
        return self.inner.param_groups

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (m and v of its slices)."""
        return sum(v.nbytes for s in self.shards for v in self.inner.state.get(id(s), {}).values()
                   if hasattr(v, "nbytes"))

    def _flat(self, arrays):
        xp = array_module(self.params[0].data)
        return xp.concatenate([a.ravel() for a in arrays])                 # (P,)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, found_inf=None):
        """found_inf: a 0-d bool (the step object's guard), the same on every rank; true: no change."""
        if Optimizer._skips(found_inf):
            return
        xp = array_module(self.params[0].data)
        for g, (lo, hi), shard in zip(self.groups, self.slices, self.shards):
            grads = self._flat([p.grad if p.grad is not None else xp.zeros_like(p.data) for p in g["params"]])
            if self.reduce_gradients:
                grads = self.comm.all_reduce(grads, op="mean")             # (1/W) sum_r g_r
            theta = self._flat([p.data for p in g["params"]])              # (P,)
            shard.data[...] = theta[lo:hi]
            shard.grad = grads[lo:hi].astype(shard.data.dtype, copy=False)
        self.inner.step()                                                  # AdamW on every S_r alone
        for g, (lo, hi), shard in zip(self.groups, self.slices, self.shards):
            mine = xp.zeros(sum(p.data.size for p in g["params"]), shard.data.dtype)
            mine[lo:hi] = shard.data
            theta = self.comm.all_reduce(mine, op="sum")                   # all-gather the slices
            start = 0
            for p in g["params"]:
                p.data[...] = theta[start:start + p.data.size].reshape(p.data.shape)
                start += p.data.size


class MeshZeroAdamW:
    """ZeRO-1 on an expert x data parallel mesh: the dense parameters' AdamW states split over all
    W ranks, each rank's experts' states over its DP group. Give it the sharded model's parameters
    (or groups of them) after training.setup; run all_reduce_gradients and clip_grad_norm_ on the
    mesh before step(). With dp_size = 1 the experts' states stay whole (a DP group of one)."""

    def __init__(self, params, mesh, **kwargs):
        groups = _as_groups(params)
        dense = [dict(g, params=[p for p in g["params"] if not is_expert_parallel(p)]) for g in groups]
        experts = [dict(g, params=[p for p in g["params"] if is_expert_parallel(p)]) for g in groups]
        self.parts = [ZeroAdamW(gs, comm, reduce_gradients=False, **kwargs)
                      for gs, comm in ((dense, mesh.world), (experts, mesh.dp)) if any(g["params"] for g in gs)]

    @property
    def param_groups(self):
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state_bytes(self) -> int:
        return sum(part.state_bytes for part in self.parts)

    def zero_grad(self):
        for part in self.parts:
            part.zero_grad()

    def step(self, found_inf=None):
        for part in self.parts:   # dense first, then experts: the same order on every rank
            part.step(found_inf)
