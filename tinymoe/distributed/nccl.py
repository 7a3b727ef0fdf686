"""The NCCL backend, through CuPy: one process per GPU, arrays never leave the GPUs.

NCCL has no all-to-all with uneven splits of its own: it is a group of point-to-point
sends and receives, one pair per peer, which NCCL runs concurrently between
ncclGroupStart and ncclGroupEnd (the same thing torch.distributed.all_to_all does).
The processes meet first through a host communicator (the toy launcher or MPI), which
carries rank 0's NCCL unique id to everybody.

`all_to_all_rows(x, send_rows, recv_rows)`, the form AllToAll and the expert-parallel
layer use, is that group on two flat buffers, as torch's all_to_all_single:

    x: [ rows for rank 0 | rows for rank 1 | ... ]   send(x.ptr + offset_j, bytes_j, peer j)
    y: [ rows from rank 0 | rows from rank 1 | ... ]  recv(y.ptr + offset_i, bytes_i, peer i)

y is allocated once; no chunk arrays, no concatenate. An input that already is a
C-contiguous CuPy array on this rank's GPU is used as it is.

Keep NVLink multicast off on shared machines: export NCCL_NVLS_ENABLE=0.
"""
from __future__ import annotations

import math

import numpy as np

from tinymoe.backend import cupy, to_device, to_numpy
from tinymoe.distributed.communicator import Communicator
from tinymoe.distributed.launch import local_rank

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

    def __init__(self, bootstrap: Communicator, device=None):
        """bootstrap: the host communicator of the same processes (toy or MPI). device: this
        rank's GPU (a cupy.cuda.Device); None: GPU (rank on this host) mod (GPUs of this host)."""
        super().__init__(bootstrap.rank, bootstrap.world_size)
        cp = cupy()
        self.bootstrap = bootstrap
        if device is None:
            device = cp.cuda.Device(local_rank(self.rank) % cp.cuda.runtime.getDeviceCount())
        self.device = device
        self.device.use()
        self.comm = nccl.NcclCommunicator(self.world_size, self._shared_unique_id(), self.rank)
        self._cp, self._device_id = cp, self.device.id   # looked up once, not per call

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
        return self._cp.cuda.get_current_stream().ptr

    def _on_device(self, x):
        """x as a C-contiguous CuPy array on this rank's GPU; no work (no copy, no call into
        CuPy) when it already is one, the usual case."""
        cp = self._cp
        if isinstance(x, cp.ndarray) and x.flags.c_contiguous:
            if x.data.device_id != self._device_id:
                raise ValueError(f"nccl all_to_all: rank {self.rank} runs on GPU {self._device_id} but got an "
                                 f"array on GPU {x.data.device_id}")
            return x
        with self.device:
            return cp.ascontiguousarray(cp.asarray(x))

    def _exchange(self, sends, recvs) -> None:
        """One grouped round of point-to-point messages: sends[j] to rank j, recvs[i] from rank i
        (raw bytes: NCCL_UINT8 with count = nbytes, so every dtype goes the same way).
        The rank's own chunk goes through the group too (a send to itself), so that its copy
        runs concurrently with the transfers instead of after them."""
        comm, stream, u8 = self.comm, self._stream(), nccl.NCCL_UINT8
        nccl.groupStart()
        for peer in range(self.world_size):
            if sends[peer].nbytes:
                comm.send(sends[peer].data.ptr, sends[peer].nbytes, u8, peer, stream)
            if recvs[peer].nbytes:
                comm.recv(recvs[peer].data.ptr, recvs[peer].nbytes, u8, peer, stream)
        nccl.groupEnd()

    def _exchange_rows(self, send_ptr, send_rows, recv_ptr, recv_rows, row_bytes) -> None:
        """The same group between two flat buffers: rows [off_j, off_j + send_rows[j]) of the
        send buffer go to rank j, rows from rank i land at [off_i, off_i + recv_rows[i]) of the
        receive buffer; offsets are pointer arithmetic, no arrays are made."""
        comm, stream, u8 = self.comm, self._stream(), nccl.NCCL_UINT8
        nccl.groupStart()
        for peer in range(self.world_size):
            n = send_rows[peer] * row_bytes
            if n:
                comm.send(send_ptr, n, u8, peer, stream)
                send_ptr += n
            n = recv_rows[peer] * row_bytes
            if n:
                comm.recv(recv_ptr, n, u8, peer, stream)
                recv_ptr += n
        nccl.groupEnd()

    def _exchange_counts(self, send_rows: list) -> list:
        """Counts first: one int64 per peer, then the host reads them (it allocates with them)."""
        cp, W = self._cp, self.world_size
        sent = cp.asarray(np.array(send_rows, np.int64))   # (W,)
        got = cp.empty(W, cp.int64)                          # (W,)
        self._exchange_rows(sent.data.ptr, [1] * W, got.data.ptr, [1] * W, 8)
        return got.get().tolist()

    def all_to_all(self, send_chunks, recv_rows=None):
        chunks = [self._on_device(c) for c in self._check_chunks(send_chunks, recv_rows)]
        row_shape, dtype = chunks[0].shape[1:], chunks[0].dtype
        if recv_rows is None:  # counts first, then the payload
            recv_rows = self._exchange_counts([c.shape[0] for c in chunks])
        elif int(recv_rows[self.rank]) != chunks[self.rank].shape[0]:
            raise ValueError(f"nccl all_to_all: rank {self.rank} sends itself {chunks[self.rank].shape[0]} rows "
                             f"but recv_rows says {int(recv_rows[self.rank])}")
        recv = [self._cp.empty((int(n), *row_shape), dtype) for n in recv_rows]
        self._exchange(chunks, recv)
        self._count_sent(chunks)
        return recv

    def all_to_all_rows(self, x, send_rows, recv_rows=None):
        x = self._on_device(x)                                             # (sum send_rows, ...)
        send_rows, recv_rows = self._check_rows(x, send_rows, recv_rows)   # lists of ints
        if recv_rows is None:
            recv_rows = self._exchange_counts(send_rows)
        row_bytes = x.itemsize * math.prod(x.shape[1:])
        y = self._cp.empty((sum(recv_rows), *x.shape[1:]), x.dtype)       # (sum recv_rows, ...), once
        self._exchange_rows(x.data.ptr, send_rows, y.data.ptr, recv_rows, row_bytes)
        self.bytes_sent += (x.shape[0] - send_rows[self.rank]) * row_bytes
        return y

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

    def group(self, ranks):
        """A new NCCL communicator of `ranks` on this rank's GPU: a group of the host bootstrap
        carries the group's own unique id (one ncclCommInitRank per group, as ncclCommSplit)."""
        return NCCLCommunicator(self.bootstrap.group(self._check_group(ranks)), device=self.device)

    def close(self):
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None
