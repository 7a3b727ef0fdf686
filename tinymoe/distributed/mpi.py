"""The MPI backend, through mpi4py: the real engine, which also spans machines.

Start with `mpiexec -n 4 python script.py`; install with `pip install 'tinymoe[mpi]'`
(mpi4py and the `mpich` wheel, no system MPI needed).

The all-to-all is MPI's Alltoallv: one send buffer holding the chunks back to back,
with a count and a displacement (offset) per destination, exactly the picture

    sendbuf = [ chunk 0 | chunk 1 | chunk 2 ]     sendcounts = [n0, n1, n2]
                ^0        ^n0       ^n0+n1        sdispls    = [0, n0, n0+n1]

Counts are in bytes (MPI.BYTE), so one code path serves every dtype. A receiver must
know its counts before the data arrive: unless the caller passes `recv_rows`, the
row counts go first, in a small Alltoall.

`all_to_all_rows(x, send_rows, recv_rows)` is that picture with no chunks at all: x is
the send buffer, y (allocated once) the receive buffer.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from tinymoe.backend import device_of, to_device, to_numpy
from tinymoe.distributed.communicator import Communicator

_MPI_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, comm=None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    def all_to_all(self, send_chunks, recv_rows=None):
        chunks = self._check_chunks(send_chunks, recv_rows)
        device = device_of(chunks[0])
        host = [np.ascontiguousarray(to_numpy(c)) for c in chunks]  # this MPI is not CUDA-aware
        send_rows = np.array([c.shape[0] for c in host], np.int64)
        sendbuf = np.concatenate(host) if len(host) > 1 else host[0]
        recv_rows, recvbuf = self._alltoallv(sendbuf, send_rows, recv_rows)
        self._count_sent(host)
        pieces = np.split(recvbuf, np.cumsum(recv_rows)[:-1])
        return [to_device(p, device) for p in pieces]

    def all_to_all_rows(self, x, send_rows, recv_rows=None):
        send_rows, recv_rows = self._check_rows(x, send_rows, recv_rows)
        sendbuf = np.ascontiguousarray(to_numpy(x))                 # this MPI is not CUDA-aware
        send_rows = np.array(send_rows, np.int64)
        _, recvbuf = self._alltoallv(sendbuf, send_rows, recv_rows)
        row_bytes = sendbuf.itemsize * int(np.prod(sendbuf.shape[1:], dtype=np.int64))
        self.bytes_sent += int(send_rows.sum() - send_rows[self.rank]) * row_bytes
        return to_device(recvbuf, device_of(x))

    def _alltoallv(self, sendbuf, send_rows, recv_rows):
        """One Alltoallv of whole rows from one flat buffer into a new one: counts first
        (a small Alltoall) unless recv_rows is known, then the payload, in bytes."""
        row_shape, dtype = sendbuf.shape[1:], sendbuf.dtype
        row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        if recv_rows is None:  # counts first ...
            recv_rows = np.empty_like(send_rows)
            self.comm.Alltoall(send_rows, recv_rows)
        recv_rows = np.asarray(recv_rows, np.int64)
        # ... then the payload
        recvbuf = np.empty((int(recv_rows.sum()), *row_shape), dtype)
        send_bytes, recv_bytes = send_rows * row_bytes, recv_rows * row_bytes
        self.comm.Alltoallv([sendbuf, (send_bytes, _exclusive_cumsum(send_bytes)), MPI.BYTE],
                            [recvbuf, (recv_bytes, _exclusive_cumsum(recv_bytes)), MPI.BYTE])
        return recv_rows, recvbuf

    def all_reduce(self, array, op="sum"):
        self._check_op(op, "mpi all_reduce")
        out = np.ascontiguousarray(to_numpy(array)).copy()
        self.comm.Allreduce(MPI.IN_PLACE, out, op=_MPI_OPS[op])
        if op == "mean":
            out /= self.world_size
        return to_device(out, device_of(array))

    def broadcast(self, array, root=0):
        out = np.ascontiguousarray(to_numpy(array)).copy()
        self.comm.Bcast(out, root=root)
        return to_device(out, device_of(array))

    def barrier(self):
        self.comm.Barrier()

    def group(self, ranks):
        """MPI_Comm_split: the ranks that pass the same colour (here the group's first rank) form
        one communicator, ordered by key (the position in `ranks`)."""
        ranks = self._check_group(ranks)
        return MPICommunicator(self.comm.Split(color=ranks[0], key=ranks.index(self.rank)))

    def close(self):
        if self.comm not in (None, MPI.COMM_WORLD):
            self.comm.Free()
            self.comm = None
