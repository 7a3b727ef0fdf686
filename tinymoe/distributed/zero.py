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

Expert-parallel parameters are not data-parallel (each rank holds its own experts): give
ZeroAdamW the shared parameters only, and the experts to a plain AdamW.
"""
from __future__ import annotations

from tinymoe.backend import array_module
from tinymoe.distributed.data_parallel import is_expert_parallel
from tinymoe.nn.parameter import Parameter
from tinymoe.optim import AdamW


class ZeroAdamW:
    """AdamW over data-parallel ranks with the states partitioned (ZeRO-1). Collective:
    every rank builds it with the same parameters (in the same order) and calls step()."""

    def __init__(self, params, comm, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ZeroAdamW: got no parameters that require gradients")
        sharded = [i for i, p in enumerate(self.params) if is_expert_parallel(p)]
        if sharded:
            raise ValueError(f"ZeroAdamW: parameters {sharded} are expert-parallel (each rank holds its "
                             "own); give them to a plain AdamW and ZeroAdamW the shared ones")
        self.comm = comm
        total = sum(p.data.size for p in self.params)                      # P
        self.lo = comm.rank * total // comm.world_size                     # S_r = [lo, hi)
        self.hi = (comm.rank + 1) * total // comm.world_size
        self.total = total
        self.shard = Parameter(self._flat([p.data for p in self.params])[self.lo:self.hi].copy())
        self.inner = AdamW([self.shard], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self):
        """The inner AdamW's one group: a learning-rate schedule sets group["lr"] here."""
        return self.inner.param_groups

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (m and v of its slice)."""
        return sum(v.nbytes for v in self.inner.state.get(id(self.shard), {}).values() if hasattr(v, "nbytes"))

    def _flat(self, arrays):
        xp = array_module(self.params[0].data)
        return xp.concatenate([a.ravel() for a in arrays])                 # (P,)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        xp = array_module(self.params[0].data)
        grads = [p.grad if p.grad is not None else xp.zeros_like(p.data) for p in self.params]
        g = self.comm.all_reduce(self._flat(grads), op="mean")             # (1/W) sum_r g_r
        theta = self._flat([p.data for p in self.params])                  # (P,)
        self.shard.data[...] = theta[self.lo:self.hi]
        self.shard.grad = g[self.lo:self.hi].astype(self.shard.data.dtype, copy=False)
        self.inner.step()                                                  # AdamW on S_r alone
        mine = xp.zeros_like(theta)
        mine[self.lo:self.hi] = self.shard.data
        theta = self.comm.all_reduce(mine, op="sum")                       # all-gather the slices
        start = 0
        for p in self.params:
            p.data[...] = theta[start:start + p.data.size].reshape(p.data.shape)
            start += p.data.size
