"""`AllToAll`: the all-to-all as an autograd Function, on one stacked buffer.

Forward: rows are grouped by destination rank, `send_rows[j]` rows for rank j; the
output stacks the rows received, grouped by source rank (`recv_rows[i]` from rank i).

    x (sum(send_rows), d) --all_to_all--> y (sum(recv_rows), d)

Backward: every output row is a copy of one input row on some rank, so dL/dx is
dL/dy sent back where each row came from: the same all-to-all with the roles of
send_rows and recv_rows swapped (the reverse all-to-all).

Both directions are one `comm.all_to_all_rows` call: the buffer travels as it is, its
chunks addressed by row offsets (no split into arrays, no concatenate afterwards).
"""
from __future__ import annotations

import numpy as np

from tinymoe.autograd import Function, Tensor
from tinymoe.backend import to_numpy


class AllToAll(Function):
    """y = all_to_all(x);  dL/dx = all_to_all^T(dL/dy) = reverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, comm=None, send_rows=None, recv_rows=None):
        ctx.comm, ctx.send_rows, ctx.recv_rows = comm, send_rows, recv_rows
        return comm.all_to_all_rows(x, send_rows, recv_rows)                  # (sum recv_rows, ...)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_to_all_rows(grad, ctx.recv_rows, ctx.send_rows)   # (sum send_rows, ...)


def exchange_counts(comm, send_rows) -> np.ndarray:
    """Step one of every all-to-all: tell each rank how many rows it will get from us.
    send_rows (world,) int -> recv_rows (world,) int64, recv_rows[i] = rows rank i sends us."""
    send_rows = np.asarray(send_rows, np.int64)                               # (W,): one row per rank
    ones = [1] * comm.world_size
    return to_numpy(comm.all_to_all_rows(send_rows, ones, ones)).astype(np.int64)


def all_to_all(x: Tensor, send_rows, comm=None, recv_rows=None):
    """Differentiable all-to-all of a row-grouped tensor. Returns (y, recv_rows).

    send_rows[j]: how many of x's leading rows (in order) go to rank j. recv_rows: the
    rows each rank sends us, exchanged first (counts, then payload) when not given."""
    import tinymoe.distributed as dist

    comm = comm if comm is not None else dist.get_world()
    send_rows = [int(n) for n in send_rows]
    if len(send_rows) != comm.world_size:
        raise ValueError(f"all_to_all: send_rows has {len(send_rows)} entries but the world has "
                         f"{comm.world_size} ranks")
    if sum(send_rows) != x.shape[0]:
        raise ValueError(f"all_to_all: send_rows add up to {sum(send_rows)} rows but x has shape {x.shape}")
    if recv_rows is None:
        recv_rows = exchange_counts(comm, send_rows)
    recv_rows = [int(n) for n in recv_rows]
    return AllToAll.apply(x, comm=comm, send_rows=send_rows, recv_rows=recv_rows), recv_rows
