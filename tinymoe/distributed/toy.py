"""The toy backend: N processes on one machine, arrays through shared memory, notes through pipes.

Every pair of ranks (i, j) shares one duplex pipe, and every rank has one *mailbox*
per peer: a shared-memory block it writes and that peer reads. Sending an array is

    small (<= 64 KiB)  the array rides inside the note itself           ("eager")
    large              copy it into my mailbox for that peer, then note
                       "mailbox tinymoe_..._0to1 holds float32 (4096, 1024)"
                       the peer copies it out and answers "read"        ("rendezvous")

A mailbox holds one letter: before writing the next one the sender waits for "read".
Mailboxes live as long as the communicator (grown when a bigger array comes), because
fresh shared memory is slow: every new page faults on first touch.

The all-to-all is then the lecture's picture, literally:

    step 1  every rank posts chunk j to rank j          (N-1 notes leave each rank)
    step 2  every rank collects chunk i from rank i     (N-1 notes arrive)

A peer that exits closes its pipe ends: waiting ranks see it at once. A peer that
hangs is caught by the timeout (default 60 s): waiting ranks raise, never hang.
"""
from __future__ import annotations

import os
import secrets
import sys
from collections import deque
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from tinymoe.backend import device_of, to_device, to_numpy
from tinymoe.distributed.communicator import Communicator, reduce_arrays

DEFAULT_TIMEOUT = 60.0
EAGER_BYTES = 64 * 1024  # arrays up to this size travel inside the note


class ToyCommunicator(Communicator):
    """peers[j] is this rank's end of the pipe to rank j (None for j == rank)."""

    backend = "toy"

    def __init__(self, rank: int, world_size: int, peers: list, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(rank, world_size)
        if len(peers) != world_size:
            raise ValueError(f"toy: {len(peers)} pipes given for a world of {world_size}")
        self.peers = peers
        self.timeout = float(timeout)
        self.outbox = [None] * world_size        # SharedMemory I write for peer j
        self.unread = [False] * world_size       # peer j has not said "read" for my last letter
        self.inbox = [None] * world_size         # peer j's mailbox for me, mapped here
        self.early = [deque() for _ in range(world_size)]  # notes that came while waiting for "read"
        self.prefix = f"tinymoe_{secrets.token_hex(4)}_{rank}to"  # + peer and size: unique names

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
        """Send `array` to `peer`: inside the note if small, else through my mailbox for it."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= EAGER_BYTES:
            return self._put(peer, ("array", array), op)
        while self.unread[peer]:  # the mailbox holds one letter: wait until the last one was read
            self._take_note(peer, op, waiting_for_read=True)
        box = self._mailbox_for(peer, array.nbytes)
        np.ndarray(array.shape, array.dtype, buffer=box.buf)[...] = array       # the copy in
        self.unread[peer] = True
        self._put(peer, ("mailbox", box.name, array.shape, array.dtype.str), op)

    def recv(self, peer: int, op: str = "recv") -> np.ndarray:
        """Wait (at most `timeout` seconds) for `peer`'s next note and return its array."""
        note = self.early[peer].popleft() if self.early[peer] else self._take_note(peer, op)
        if note[0] == "array":
            return note[1]
        _, name, shape, dtype = note
        if self.inbox[peer] is None or self.inbox[peer].name != name:  # new (or grown) mailbox
            if self.inbox[peer] is not None:
                self.inbox[peer].close()
            self.inbox[peer] = _attach(name)
        out = np.ndarray(shape, dtype, buffer=self.inbox[peer].buf).copy()     # the copy out
        self._put(peer, ("read",), op)                                         # the mailbox is free
        return out

    # ------------------------------------------------------------ the pipes and mailboxes
    def _put(self, peer, note, op):
        try:
            self.peers[peer].send(note)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise RuntimeError(f"toy {op}: rank {self.rank} cannot reach rank {peer}: its process exited") from e

    def _take_note(self, peer, op, waiting_for_read=False):
        """The next data note from `peer`; "read" notes on the way free our mailbox for it.
        While we wait for "read" (before writing the mailbox), data notes are kept for later."""
        conn = self.peers[peer]
        while True:
            try:
                if not conn.poll(self.timeout):
                    raise RuntimeError(
                        f"toy {op}: rank {self.rank} waited {self.timeout:g} s for rank {peer}, which is alive "
                        f"but sent nothing: it hung or is not calling {op}. Raise the limit with "
                        "init('toy', timeout=...) or TINYMOE_TIMEOUT")
                note = conn.recv()
            except (EOFError, ConnectionResetError, OSError) as e:
                raise RuntimeError(f"toy {op}: rank {self.rank} lost rank {peer}: its process exited") from e
            if note[0] == "read":
                self.unread[peer] = False
                if waiting_for_read:
                    return note
            elif waiting_for_read:
                self.early[peer].append(note)
            else:
                return note

    def _mailbox_for(self, peer, nbytes):
        box = self.outbox[peer]
        if box is None or box.size < nbytes:
            size = max(nbytes, 2 * box.size if box is not None else 0)
            if box is not None:
                box.close()
                box.unlink()
            name = f"{self.prefix}{peer}_{size}"
            box = self.outbox[peer] = SharedMemory(name=name, create=True, size=size)
        return box

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

    def group(self, ranks):
        return ToyGroup(self, self._check_group(ranks))

    def close(self):
        for conn in self.peers:
            if conn is not None and not conn.closed:
                conn.close()
        for j, box in enumerate(self.outbox):
            if box is not None:
                box.close()
                box.unlink()
                self.outbox[j] = None
        for j, box in enumerate(self.inbox):
            if box is not None:
                box.close()
                self.inbox[j] = None


class ToyGroup(ToyCommunicator):
    """Some ranks of a toy world (an expert- or data-parallel group of a mesh), talking through
    the world's pipes and mailboxes: peer j of the group is rank ranks[j] of the world.

    Every collective of ToyCommunicator is written with send / recv to group-local peers, so
    translating those two is all a group needs. Messages of the world and of its groups share
    one pipe per pair of ranks; they stay matched because every rank calls the collectives in
    the same order (as MPI requires of communicators too)."""

    def __init__(self, world: ToyCommunicator, ranks: list):
        Communicator.__init__(self, ranks.index(world.rank), len(ranks))   # not the world's pipes
        self.world, self.ranks, self.timeout = world, list(ranks), world.timeout

    def send(self, peer, array, op="send"):
        self.world.send(self.ranks[peer], array, op)

    def recv(self, peer, op="recv"):
        return self.world.recv(self.ranks[peer], op)

    def close(self):
        """Nothing to release: the world owns the pipes and mailboxes."""


def _attach(name: str) -> SharedMemory:
    """Map a peer's mailbox without registering it with our resource tracker: its owner
    unlinks it (Python < 3.13 registers every attach, and would then unlink it twice)."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None
    try:
        return SharedMemory(name=name)
    finally:
        resource_tracker.register = register
