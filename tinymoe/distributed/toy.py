"""The toy backend: N processes on one machine, arrays through shared memory, notes through pipes.

Every pair of ranks (i, j) shares one duplex pipe. To send an array, the sender
copies it into a fresh shared-memory block and drops a small note in the pipe
("block psm_3f2a holds float32 (128, 64)"); the receiver reads the note, copies the
block out and deletes it. The all-to-all is then the lecture's picture, literally:

    step 1  every rank posts chunk j to rank j          (N-1 notes leave each rank)
    step 2  every rank collects chunk i from rank i     (N-1 notes arrive)

Notes are tiny, so step 1 never blocks on a full pipe, whatever the array sizes.
A peer that exits closes its pipe ends: waiting ranks see it at once. A peer that
hangs is caught by the timeout (default 60 s): waiting ranks raise, never hang.
"""
from __future__ import annotations

import os
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from tinymoe.backend import device_of, to_device, to_numpy
from tinymoe.distributed.communicator import Communicator, reduce_arrays

DEFAULT_TIMEOUT = 60.0


class ToyCommunicator(Communicator):
    """peers[j] is this rank's end of the pipe to rank j (None for j == rank)."""

    backend = "toy"

    def __init__(self, rank: int, world_size: int, peers: list, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(rank, world_size)
        if len(peers) != world_size:
            raise ValueError(f"toy: {len(peers)} pipes given for a world of {world_size}")
        self.peers = peers
        self.timeout = float(timeout)

    @classmethod
    def from_env(cls) -> "ToyCommunicator":
        """The communicator of a worker started by `python -m tinymoe.distributed.launch`."""
        rank = int(os.environ["TINYMOE_RANK"])
        world_size = int(os.environ["TINYMOE_WORLD_SIZE"])
        fds = [int(f) for f in os.environ["TINYMOE_TOY_PIPES"].split(",")]
        peers = [None if j == rank else Connection(fd) for j, fd in enumerate(fds)]
        timeout = float(os.environ.get("TINYMOE_TIMEOUT", DEFAULT_TIMEOUT))
        return cls(rank, world_size, peers, timeout)

    # ------------------------------------------------------------ one message
    def send(self, peer: int, array: np.ndarray, op: str = "send") -> None:
        """Put `array` in a new shared-memory block and tell `peer` where it is."""
        array = np.ascontiguousarray(array)
        name = None
        if array.nbytes > 0:
            block = SharedMemory(create=True, size=array.nbytes)
            np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array  # the copy in
            name = block.name
            block.close()
            # The receiver deletes the block; our process no longer tracks it.
            resource_tracker.unregister(block._name, "shared_memory")
        try:
            self.peers[peer].send((name, array.shape, array.dtype.str))  # the note
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise RuntimeError(f"toy {op}: rank {self.rank} cannot reach rank {peer}: its process exited") from e

    def recv(self, peer: int, op: str = "recv") -> np.ndarray:
        """Wait (at most `timeout` seconds) for `peer`'s note, then copy its block out."""
        conn = self.peers[peer]
        try:
            if not conn.poll(self.timeout):
                raise RuntimeError(
                    f"toy {op}: rank {self.rank} waited {self.timeout:g} s for rank {peer}, which is alive but "
                    f"sent nothing: it hung or is not calling {op}. Raise the limit with "
                    "init('toy', timeout=...) or TINYMOE_TIMEOUT")
            name, shape, dtype = conn.recv()
        except (EOFError, ConnectionResetError, OSError) as e:
            raise RuntimeError(f"toy {op}: rank {self.rank} lost rank {peer}: its process exited") from e
        if name is None:
            return np.empty(shape, dtype)
        block = SharedMemory(name=name)
        out = np.ndarray(shape, dtype, buffer=block.buf).copy()  # the copy out
        block.close()
        block.unlink()
        return out

    # ------------------------------------------------------------ collectives
    def all_to_all(self, send_chunks, recv_rows=None):
        chunks = self._check_chunks(send_chunks, recv_rows)
        device = device_of(chunks[0])
        others = [j for j in range(self.world_size) if j != self.rank]
        # step 1: chunk j goes to rank j
        for j in others:
            self.send(j, to_numpy(chunks[j]), "all_to_all")
        # step 2: chunk i of every rank i arrives here; our own chunk stays
        recv = [chunks[i].copy() if i == self.rank else to_device(self.recv(i, "all_to_all"), device)
                for i in range(self.world_size)]
        self._count_sent(chunks)
        return recv

    def all_gather(self, array) -> list:
        """Every rank gets [array of rank 0, ..., array of rank N-1]."""
        host = to_numpy(array)
        for j in range(self.world_size):
            if j != self.rank:
                self.send(j, host, "all_gather")
        return [host if i == self.rank else self.recv(i, "all_gather") for i in range(self.world_size)]

    def all_reduce(self, array, op="sum"):
        self._check_op(op, "toy all_reduce")
        gathered = self.all_gather(array)
        for i, a in enumerate(gathered):
            if a.shape != gathered[self.rank].shape:
                raise ValueError(f"toy all_reduce: rank {i} sent shape {a.shape}, rank {self.rank} has "
                                 f"{gathered[self.rank].shape}")
        return to_device(reduce_arrays(gathered, op), device_of(array))  # same order on every rank

    def broadcast(self, array, root=0):
        if self.rank == root:
            for j in range(self.world_size):
                if j != root:
                    self.send(j, to_numpy(array), "broadcast")
            return array.copy()
        return to_device(self.recv(root, "broadcast"), device_of(array))

    def barrier(self):
        self.all_to_all([np.zeros(0, np.int8)] * self.world_size)

    def close(self):
        for conn in self.peers:
            if conn is not None and not conn.closed:
                conn.close()
