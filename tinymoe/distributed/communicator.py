"""The `Communicator` interface: what every backend (toy, MPI, NCCL) can do.

A communicator joins `world_size` processes; each knows its `rank` (0 .. world_size-1).
Expert parallelism needs one collective above all, the all-to-all:

    rank 0 sends [a0 a1 a2]        rank 0 receives [a0 b0 c0]
    rank 1 sends [b0 b1 b2]  --->  rank 1 receives [a1 b1 c1]
    rank 2 sends [c0 c1 c2]        rank 2 receives [a2 b2 c2]

Chunk j of rank i goes to rank j, where it becomes chunk i: a transpose of the
(sender, receiver) grid. Chunks may differ in their first dimension (uneven splits,
zero rows included) but share dtype and trailing shape.

Two forms of the same collective:

    all_to_all(chunks)                       a list of W arrays in, a list of W arrays out
    all_to_all_rows(x, send_rows, recv_rows) one buffer in, one buffer out (what real
                                             systems do: torch's all_to_all_single, MPI's
                                             Alltoallv): chunk j is the row range
                                             x[off_j : off_j + send_rows[j]], received
                                             chunk i lands in y's i-th row range

The list form is the picture above; the buffer form is the fast one (one allocation, no
concatenate, chunks addressed by offsets), and the one AllToAll and the expert-parallel
layer use. The base class implements the buffer form through the list form, so every
backend has both; NCCL and MPI override it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tinymoe.backend import array_module

REDUCE_OPS = ("sum", "mean", "max", "min")


class Communicator:
    """Base class. Subclasses implement the four collectives below."""

    backend = "base"

    def __init__(self, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank {rank} is not in a world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent = 0  # bytes this rank sent to OTHER ranks through all_to_all

    # ------------------------------------------------------------ the interface
    def all_to_all(self, send_chunks: Sequence, recv_rows: Sequence[int] | None = None) -> list:
        """send_chunks[j] goes to rank j; returns recv_chunks with recv_chunks[i] from rank i.

        recv_rows (optional): the first dimension of each chunk this rank will receive,
        when the caller already knows it (the expert-parallel layer exchanges counts
        first); backends that need it (MPI, NCCL) skip their own counts exchange."""
        raise NotImplementedError

    def all_to_all_rows(self, x, send_rows: Sequence[int], recv_rows: Sequence[int] | None = None):
        """The all-to-all on one buffer: x (sum(send_rows), ...) -> y (sum(recv_rows), ...).

        x's rows are grouped by destination: the first send_rows[0] go to rank 0, the next
        send_rows[1] to rank 1, ... y's rows are grouped by source: recv_rows[i] rows from
        rank i, in rank order. send_rows / recv_rows are host integers (lists or NumPy
        arrays). Without recv_rows, the counts are exchanged first.

        This generic version goes through the list form (split x into views, all_to_all,
        concatenate); NCCL and MPI move the rows straight between the two buffers."""
        send_rows, recv_rows = self._check_rows(x, send_rows, recv_rows)
        xp = array_module(x)
        chunks = xp.split(x, np.cumsum(send_rows)[:-1].tolist())     # views, not copies
        got = self.all_to_all(chunks, recv_rows=recv_rows)
        y = xp.concatenate(got)
        if recv_rows is not None and y.shape[0] != sum(recv_rows):
            raise ValueError(f"{self.backend} all_to_all: recv_rows says {sum(recv_rows)} rows in all, but "
                             f"{y.shape[0]} arrived ({[c.shape[0] for c in got]} per rank) on rank {self.rank}")
        return y

    def all_reduce(self, array, op: str = "sum"):
        """Every rank gets op(array of rank 0, ..., array of rank world_size-1), identical bits."""
        raise NotImplementedError

    def broadcast(self, array, root: int = 0):
        """Every rank gets root's array (other ranks pass an array of the same shape and dtype)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Returns once every rank has called it."""
        raise NotImplementedError

    def group(self, ranks: Sequence[int]) -> "Communicator":
        """The communicator of the processes `ranks` (ranks of this world, this one among them),
        numbered 0 .. len(ranks)-1 in that order. Collective: every rank of the world calls it,
        each with its own group's ranks; the groups partition the world (mesh.py makes them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release pipes / communicators. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------ shared checks
    def _check_chunks(self, send_chunks, recv_rows=None) -> list:
        """The chunk list is valid: one chunk per rank, one dtype, one trailing shape."""
        name = f"{self.backend} all_to_all"
        if isinstance(send_chunks, np.ndarray) or not isinstance(send_chunks, (list, tuple)):
            raise TypeError(f"{name}: send_chunks must be a list of {self.world_size} arrays, one per rank, "
                            f"got {type(send_chunks).__name__}")
        if len(send_chunks) != self.world_size:
            raise ValueError(f"{name}: got {len(send_chunks)} chunks but the world has {self.world_size} ranks "
                             f"(rank {self.rank}); send exactly one chunk (possibly empty) per rank")
        if recv_rows is not None and len(recv_rows) != self.world_size:
            raise ValueError(f"{name}: recv_rows has {len(recv_rows)} entries, expected {self.world_size}")
        chunks = list(send_chunks)
        first = chunks[0]
        for j, c in enumerate(chunks):
            if not hasattr(c, "shape") or c.ndim == 0:
                raise TypeError(f"{name}: chunk {j} must be an array with at least one dimension, got {c!r:.60}")
            if c.dtype != first.dtype or c.shape[1:] != first.shape[1:]:
                raise ValueError(f"{name}: chunk {j} has dtype {c.dtype} and shape {c.shape}, but chunk 0 has "
                                 f"dtype {first.dtype} and shape {first.shape}: chunks may differ only in their "
                                 "first dimension")
        return chunks

    def _check_rows(self, x, send_rows, recv_rows=None) -> tuple[list, list | None]:
        """all_to_all_rows' arguments are valid (the list form's checks, on counts): one count
        per rank, counts that add up to x's rows, none negative, and what this rank sends
        itself is what it expects from itself. Returns both as lists of Python ints."""
        name, W = f"{self.backend} all_to_all", self.world_size
        if not hasattr(x, "shape") or x.ndim == 0:
            raise TypeError(f"{name}: x must be an array with at least one dimension, got {x!r:.60}")
        send_rows = send_rows.tolist() if hasattr(send_rows, "tolist") else [int(n) for n in send_rows]
        if len(send_rows) != W:
            raise ValueError(f"{name}: send_rows has {len(send_rows)} entries but the world has {W} ranks "
                             f"(rank {self.rank}); give exactly one count (possibly 0) per rank")
        if sum(send_rows) != x.shape[0] or min(send_rows) < 0:
            raise ValueError(f"{name}: send_rows {send_rows} add up to {sum(send_rows)} rows but x has shape "
                             f"{x.shape}" + (" (negative counts)" if min(send_rows) < 0 else ""))
        if recv_rows is not None:
            recv_rows = recv_rows.tolist() if hasattr(recv_rows, "tolist") else [int(n) for n in recv_rows]
            if len(recv_rows) != W:
                raise ValueError(f"{name}: recv_rows has {len(recv_rows)} entries, expected {W}")
            if min(recv_rows) < 0:
                raise ValueError(f"{name}: recv_rows {recv_rows} has negative counts")
            if recv_rows[self.rank] != send_rows[self.rank]:
                raise ValueError(f"{name}: rank {self.rank} sends itself {send_rows[self.rank]} rows but "
                                 f"recv_rows says {recv_rows[self.rank]}")
        return send_rows, recv_rows

    def _check_group(self, ranks) -> list:
        """group()'s ranks are valid: distinct ranks of this world, this rank among them."""
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"{self.backend} group: ranks {ranks} must be distinct ranks of a world of "
                             f"{self.world_size}")
        if self.rank not in ranks:
            raise ValueError(f"{self.backend} group: rank {self.rank} asks for group {ranks}, which it is not in")
        return ranks

    def _count_sent(self, chunks) -> None:
        self.bytes_sent += sum(int(c.nbytes) for j, c in enumerate(chunks) if j != self.rank)

    @staticmethod
    def _check_op(op: str, name: str) -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"{name}: unknown reduce op {op!r}; expected one of {REDUCE_OPS}")


def reduce_arrays(arrays: Sequence, op: str):
    """op over a list of same-shape arrays, always in rank order, so all ranks get the same bits."""
    xp = array_module(arrays[0])
    out = arrays[0].copy()
    for a in arrays[1:]:
        if op in ("sum", "mean"):
            out += a
        elif op == "max":
            xp.maximum(out, a, out=out)
        else:
            xp.minimum(out, a, out=out)
    if op == "mean":
        out /= len(arrays)
    return out


class SingleProcess(Communicator):
    """A world of one: every collective is the identity. Lets expert-parallel code run unlaunched."""

    backend = "single"

    def __init__(self):
        super().__init__(0, 1)

    def all_to_all(self, send_chunks, recv_rows=None):
        return [c.copy() for c in self._check_chunks(send_chunks, recv_rows)]

    def all_to_all_rows(self, x, send_rows, recv_rows=None):
        self._check_rows(x, send_rows, recv_rows)
        return x.copy()

    def all_reduce(self, array, op="sum"):
        self._check_op(op, "single all_reduce")
        return array.copy()

    def broadcast(self, array, root=0):
        return array.copy()

    def barrier(self):
        pass

    def group(self, ranks):
        self._check_group(ranks)
        return self
