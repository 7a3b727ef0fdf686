"""The 2-D process mesh: W = ep_size x dp_size ranks, experts across one axis, data across both.

Rank r sits at (dp_rank, ep_rank) = divmod(r, ep_size). With W = 8 as 4 EP x 2 DP:

                  ep_rank 0    ep_rank 1    ep_rank 2    ep_rank 3
    dp_rank 0     rank 0       rank 1       rank 2       rank 3       <- EP group 0: experts 0..E-1 once,
                  E/4 experts  E/4 experts  E/4 experts  E/4 experts     the all-to-all runs in here
    dp_rank 1     rank 4       rank 5       rank 6       rank 7       <- EP group 1: a replica of group 0
                     |            |            |            |
                  DP group 0   DP group 1   DP group 2   DP group 3   <- the ranks holding the same experts

    all-to-all (tokens to their experts)       within each EP group (ep_size ranks)
    dense gradients (attention, embeddings,    all-reduce over the whole world (W ranks: all hold them)
      gates, norms)
    expert gradients                           all-reduce over each DP group (dp_size ranks: the
                                               replicas of those experts); the reverse all-to-all
                                               already summed the EP group's tokens into them
    ZeRO-1 optimizer states                    dense: split over the world; experts: over the DP group
    gradient-norm clipping                     ||g||^2 = ||g_dense||^2 + sum over the EP group of
                                               ||g_experts(rank)||^2 (each expert counted once)
    checkpoint                                 experts gathered within the EP group (every EP group
                                               holds the full model); rank 0 writes

The EP groups are consecutive ranks: across hosts, one host's GPUs are one EP group (the
all-to-all stays on NVLink) and the data-parallel all-reduce crosses the network.

ep_size = W (the default) is plain expert parallelism over every rank (dp_size = 1);
ep_size = 1 is plain data parallelism, every rank holding every expert. A `Mesh` is itself
the world's communicator (its collectives are the world's), with `ep` and `dp` attached:
code written for one communicator takes a mesh unchanged.
"""
from __future__ import annotations

from tinymoe.distributed.communicator import Communicator, SingleProcess


class Mesh(Communicator):
    """The world communicator, with its expert-parallel group `ep` and data-parallel group `dp`.
    Collective to build: every rank of the world builds it with the same ep_size."""

    def __init__(self, world: Communicator, ep_size: int | None = None):
        W = world.world_size
        ep_size = W if ep_size is None else ep_size
        if not isinstance(ep_size, int) or ep_size < 1 or W % ep_size:
            raise ValueError(f"mesh: ep_size={ep_size!r} must be a positive divisor of the world size {W} "
                             f"(--ep-size: the expert-parallel group size; {W} ranks = ep_size x dp_size)")
        # not Communicator.__init__: bytes_sent is the world's (a property below)
        self.world, self.rank, self.world_size, self.backend = world, world.rank, W, world.backend
        self.ep_size, self.dp_size = ep_size, W // ep_size
        self.dp_rank, self.ep_rank = divmod(world.rank, ep_size)
        ep_ranks = [self.dp_rank * ep_size + e for e in range(ep_size)]     # my row of the picture
        dp_ranks = [d * ep_size + self.ep_rank for d in range(self.dp_size)]  # my column
        self.ep = self._group(ep_ranks)   # first EP, then DP, on every rank: group creation is collective
        self.dp = self._group(dp_ranks)

    def _group(self, ranks):
        if len(ranks) == self.world_size:
            return self.world
        return SingleProcess() if len(ranks) == 1 else self.world.group(ranks)

    @property
    def layout(self) -> str:
        return f"{self.ep_size} EP x {self.dp_size} DP"

    @property
    def bytes_sent(self) -> int:
        return self.world.bytes_sent

    # ------------------------------------------------------------ the world's collectives
    def all_to_all(self, send_chunks, recv_rows=None):
        return self.world.all_to_all(send_chunks, recv_rows)

    def all_to_all_rows(self, x, send_rows, recv_rows=None):
        return self.world.all_to_all_rows(x, send_rows, recv_rows)

    def all_reduce(self, array, op="sum"):
        return self.world.all_reduce(array, op)

    def broadcast(self, array, root=0):
        return self.world.broadcast(array, root)

    def barrier(self):
        self.world.barrier()

    def group(self, ranks):
        return self.world.group(ranks)

    def close(self):
        for comm in (self.ep, self.dp):   # the groups this mesh made; the world belongs to its caller
            if comm is not self.world:
                comm.close()

    def __repr__(self):
        return f"Mesh({self.layout}, rank={self.rank} at dp {self.dp_rank}, ep {self.ep_rank}, {self.backend})"


def as_mesh(comm: Communicator) -> Mesh:
    """A mesh as it is; a plain communicator as the mesh it always was: every rank one EP group
    (ep = the world, dp = a world of one). Makes no collective call."""
    return comm if isinstance(comm, Mesh) else Mesh(comm)
