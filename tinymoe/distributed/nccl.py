"""The NCCL backend, through CuPy: one process per GPU, arrays never leave the GPUs.

NCCL has no all-to-all with uneven splits of its own: it is a group of point-to-point
sends and receives, one pair per peer, which NCCL runs concurrently between
ncclGroupStart and ncclGroupEnd (the same thing torch.distributed.all_to_all does).
The processes meet first through a host communicator (the toy launcher or MPI), which
carries rank 0's NCCL unique id to everybody.

Keep NVLink multicast off on shared machines: export NCCL_NVLS_ENABLE=0.
"""
from __future__ import annotations

import os

import numpy as np

from tinymoe.backend import cupy, to_device, to_numpy
from tinymoe.distributed.communicator import Communicator

try:
    from cupy.cuda import nccl
except Exception as e:  # ImportError, or CuPy built without NCCL
    raise ImportError(f"backend 'nccl' needs CuPy with NCCL: pip install 'tinymoe[cuda12]' ({e})") from e

_NCCL_TYPES = {np.dtype(k): v for k, v in [
    ("int8", nccl.NCCL_INT8), ("uint8", nccl.NCCL_UINT8), ("int32", nccl.NCCL_INT32),
    ("int64", nccl.NCCL_INT64), ("float16", nccl.NCCL_FLOAT16), ("float32", nccl.NCCL_FLOAT32),
    ("float64", nccl.NCCL_FLOAT64)]}
_NCCL_OPS = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}


class NCCLCommunicator(Communicator):
    backend = "nccl"

    def __init__(self, bootstrap: Communicator):
        super().__init__(bootstrap.rank, bootstrap.world_size)
        cp = cupy()
        self.bootstrap = bootstrap
        local_rank = int(os.environ.get("TINYMOE_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", self.rank)))
        self.device = cp.cuda.Device(local_rank % cp.cuda.runtime.getDeviceCount())
        self.device.use()
        self.comm = nccl.NcclCommunicator(self.world_size, self._shared_unique_id(), self.rank)

    def _shared_unique_id(self):
        """Rank 0's NCCL id (128 bytes), sent to everybody through the host communicator.
        CuPy 14 gives bytes, older CuPy a tuple of signed chars: byte 128 says which."""
        raw = np.zeros(129, np.uint8)
        if self.rank == 0:
            uid = nccl.get_unique_id()
            is_bytes = isinstance(uid, bytes)
            raw[:128] = np.frombuffer(uid if is_bytes else np.array(uid, np.int8).tobytes(), np.uint8)
            raw[128] = is_bytes
        raw = to_numpy(self.bootstrap.broadcast(raw, root=0))
        return raw[:128].tobytes() if raw[128] else tuple(raw[:128].view(np.int8).tolist())

    def _stream(self):
        return cupy().cuda.get_current_stream().ptr

    def _exchange(self, sends, recvs) -> None:
        """One grouped round of point-to-point messages: sends[j] to rank j, recvs[i] from rank i
        (raw bytes: NCCL_UINT8 with count = nbytes, so every dtype goes the same way).
        The rank's own chunk goes through the group too (a send to itself), so that its copy
        runs concurrently with the transfers instead of after them."""
        stream = self._stream()
        nccl.groupStart()
        for peer in range(self.world_size):
            if sends[peer].nbytes:
                self.comm.send(sends[peer].data.ptr, sends[peer].nbytes, nccl.NCCL_UINT8, peer, stream)
            if recvs[peer].nbytes:
                self.comm.recv(recvs[peer].data.ptr, recvs[peer].nbytes, nccl.NCCL_UINT8, peer, stream)
        nccl.groupEnd()

    def all_to_all(self, send_chunks, recv_rows=None):
        cp = cupy()
        chunks = [cp.ascontiguousarray(to_device(c, "cuda")) for c in self._check_chunks(send_chunks, recv_rows)]
        row_shape, dtype = chunks[0].shape[1:], chunks[0].dtype
        if recv_rows is None:  # counts first (one int64 per peer), then the payload
            send_rows = cp.asarray(np.array([c.shape[0] for c in chunks], np.int64))   # (W,)
            got = cp.empty(self.world_size, cp.int64)                                  # (W,)
            self._exchange([send_rows[j:j + 1] for j in range(self.world_size)],
                           [got[i:i + 1] for i in range(self.world_size)])
            recv_rows = got.get()  # the host needs the sizes to allocate
        elif int(recv_rows[self.rank]) != chunks[self.rank].shape[0]:
            raise ValueError(f"nccl all_to_all: rank {self.rank} sends itself {chunks[self.rank].shape[0]} rows "
                             f"but recv_rows says {int(recv_rows[self.rank])}")
        recv = [cp.empty((int(n), *row_shape), dtype) for n in recv_rows]
        self._exchange(chunks, recv)
        self._count_sent(chunks)
        return recv

    def all_reduce(self, array, op="sum"):
        self._check_op(op, "nccl all_reduce")
        cp = cupy()
        x = cp.ascontiguousarray(to_device(array, "cuda"))
        if x.dtype not in _NCCL_TYPES:
            raise TypeError(f"nccl all_reduce: dtype {x.dtype} is not supported by NCCL here")
        out = cp.empty_like(x)
        self.comm.allReduce(x.data.ptr, out.data.ptr, x.size, _NCCL_TYPES[x.dtype], _NCCL_OPS[op], self._stream())
        if op == "mean":
            out /= self.world_size
        return out

    def broadcast(self, array, root=0):
        cp = cupy()
        out = cp.ascontiguousarray(to_device(array, "cuda")).copy()
        self.comm.bcast(out.data.ptr, out.nbytes, nccl.NCCL_UINT8, root, self._stream())
        return out

    def barrier(self):
        self.all_reduce(cupy().zeros(1, cupy().float32))
        cupy().cuda.get_current_stream().synchronize()

    def close(self):
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None
