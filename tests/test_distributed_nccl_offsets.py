"""The NCCL backend's bookkeeping on a machine without a GPU: a fake CuPy (NumPy arrays with a
device pointer) and a fake NCCL (every send/recv of a group recorded, then matched and
copied with memmove) run the real NCCLCommunicator code for W ranks in one process. This
checks the pointer offsets, byte counts and bytes_sent of all_to_all_rows and all_to_all;
the real thing is tests/test_distributed_nccl.py (gpu-marked)."""
import contextlib
import ctypes
import sys
import types

import numpy as np
import pytest


class FakeGPUArray(np.ndarray):
    """A NumPy array that answers like a CuPy one: .data.ptr, .data.device_id."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data, device_id=0)


def _gpu(a):
    return np.ascontiguousarray(a).view(FakeGPUArray)


class FakeNccl(types.ModuleType):
    NCCL_UINT8 = 99

    def __init__(self):
        super().__init__("cupy.cuda.nccl")
        for name in ("INT8", "INT32", "INT64", "FLOAT16", "FLOAT32", "FLOAT64", "SUM", "MAX", "MIN"):
            setattr(self, f"NCCL_{name}", 0)
        self.posted, self.groups = [], 0

    def groupStart(self):
        self.groups += 1

    def groupEnd(self):
        pass

    def deliver(self):
        """Match every send (a -> b) with the recv (b <- a) in posting order and copy the bytes."""
        sends = [p for p in self.posted if p[0] == "send"]
        recvs = [p for p in self.posted if p[0] == "recv"]
        for _, me, ptr, n, peer in recvs:
            match = next(s for s in sends if s[1] == peer and s[4] == me)
            sends.remove(match)
            assert match[3] == n, f"rank {peer} sends {match[3]} bytes to rank {me}, which expects {n}"
            ctypes.memmove(ptr, match[2], n)
        assert not sends, f"sends nobody received: {sends}"
        self.posted.clear()


class FakeComm:
    def __init__(self, rank, nccl):
        self.rank, self.nccl = rank, nccl

    def send(self, ptr, n, dtype, peer, stream):
        assert dtype == FakeNccl.NCCL_UINT8 and n > 0 and stream == 0
        self.nccl.posted.append(("send", self.rank, ptr, n, peer))

    def recv(self, ptr, n, dtype, peer, stream):
        assert dtype == FakeNccl.NCCL_UINT8 and n > 0 and stream == 0
        self.nccl.posted.append(("recv", self.rank, ptr, n, peer))


@pytest.fixture
def world(monkeypatch):
    """make(W) -> W NCCLCommunicators over the fake NCCL, and the fake."""
    fake_nccl = FakeNccl()
    cuda = types.SimpleNamespace(nccl=fake_nccl, get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    fake_cp = types.SimpleNamespace(ndarray=FakeGPUArray, cuda=cuda, int64=np.int64,
                                    empty=lambda shape, dtype: np.empty(shape, dtype).view(FakeGPUArray),
                                    asarray=_gpu, ascontiguousarray=_gpu)
    cupy_mod, cuda_mod = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
    cuda_mod.nccl, cupy_mod.cuda = fake_nccl, cuda_mod
    monkeypatch.setitem(sys.modules, "cupy", cupy_mod)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda_mod)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", fake_nccl)
    monkeypatch.delitem(sys.modules, "tinymoe.distributed.nccl", raising=False)
    from tinymoe.distributed.nccl import NCCLCommunicator
    monkeypatch.delitem(sys.modules, "tinymoe.distributed.nccl")   # nobody else gets the fake one

    def make(W):
        comms = []
        for r in range(W):
            c = object.__new__(NCCLCommunicator)
            c.rank, c.world_size, c.bytes_sent = r, W, 0
            c.comm, c._cp, c._device_id, c.device = FakeComm(r, fake_nccl), fake_cp, 0, contextlib.nullcontext()
            comms.append(c)
        return comms
    return make, fake_nccl


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_rows_land_at_the_right_offsets(world, W):
    make, fake = world
    comms = make(W)
    g = np.random.default_rng(W)
    rows = g.integers(0, 4, (W, W))                     # rows[i, j]: rank i sends rank j, zeros likely
    rows[:, W // 2] = 0                                  # a rank that receives nothing
    for row_shape, dtype in [((3,), np.float32), ((), np.int64), ((2, 5), np.float64)]:
        xs = [(g.standard_normal((int(rows[r].sum()), *row_shape)) * 100).astype(dtype) for r in range(W)]
        ys = [c.all_to_all_rows(_gpu(x), rows[c.rank], rows[:, c.rank]) for c, x in zip(comms, xs)]
        lists = [c.all_to_all(np.split(_gpu(x), np.cumsum(rows[c.rank])[:-1]), rows[:, c.rank])
                 for c, x in zip(comms, xs)]
        fake.deliver()
        for r in range(W):
            pieces = [np.split(xs[i], np.cumsum(rows[i])[:-1])[r] for i in range(W)]   # chunk r of every rank
            want = np.concatenate(pieces)
            assert type(ys[r]) is FakeGPUArray and ys[r].shape == want.shape and ys[r].dtype == want.dtype
            assert np.array_equal(np.asarray(ys[r]), want), f"rank {r} of {W}"
            assert all(np.array_equal(np.asarray(a), b) for a, b in zip(lists[r], pieces))
    row_bytes = 4 * 3 + 8 + 8 * 10
    for r, c in enumerate(comms):
        assert c.bytes_sent == 2 * (rows[r].sum() - rows[r, r]) * row_bytes


def test_contiguous_input_is_used_as_is_and_others_are_converted(world):
    make, fake = world
    (c0, c1) = make(2)
    x = _gpu(np.arange(12.0).reshape(6, 2))
    assert c0._on_device(x) is x
    host = np.arange(12.0).reshape(6, 2)
    strided = _gpu(np.repeat(host, 2, axis=0))[::2]
    assert not strided.flags.c_contiguous
    y0 = c0.all_to_all_rows(host, [2, 4], [2, 1])        # a NumPy input: copied to the "GPU"
    y1 = c1.all_to_all_rows(strided[:3], [1, 2], [4, 2])  # a strided one: made contiguous
    fake.deliver()
    assert np.array_equal(np.asarray(y0), np.concatenate([host[:2], host[:1]]))   # rank 1's first row is host[0]
    assert np.array_equal(np.asarray(y1), np.concatenate([host[2:6], host[1:3]]))


class FakeBootstrap:
    """A host communicator of one rank's view: group() gives the group's view, broadcast gives
    what the group's rank 0 sent (recorded in `sent`, shared by every view)."""

    def __init__(self, rank, world_size, sent):
        self.rank, self.world_size, self.sent, self.groups = rank, world_size, sent, []

    def group(self, ranks):
        self.groups.append(list(ranks))
        return FakeBootstrap(ranks.index(self.rank), len(ranks), self.sent)

    def broadcast(self, array, root=0):
        if self.rank == root:
            self.sent.append(array.copy())
        return self.sent[-1].copy()


def test_group_is_a_new_nccl_communicator_through_the_bootstrap_group(world, monkeypatch):
    # the mesh's NCCL groups: one NcclCommunicator per group, its id sent by the group's first rank
    # through the same group of the host bootstrap, on the GPU of the world communicator
    make, fake = world
    comms = make(4)
    made = []
    monkeypatch.setattr(fake, "get_unique_id", lambda: bytes(range(128)), raising=False)
    monkeypatch.setattr(fake, "NcclCommunicator", lambda n, uid, rank: made.append((n, uid, rank)) or "comm",
                        raising=False)
    device = types.SimpleNamespace(id=3, use=lambda: None)
    sent = []
    groups = []
    for c in comms[2:]:                                  # ranks 2 and 3 form group [2, 3], rank 2 first
        c.bootstrap, c.device = FakeBootstrap(c.rank, 4, sent), device
        monkeypatch.setitem(type(c).__init__.__globals__, "cupy", lambda: c._cp)
        groups.append(c.group([2, 3]))
    assert [(g.rank, g.world_size, g.device, g.comm) for g in groups] == [(0, 2, device, "comm"), (1, 2, device, "comm")]
    assert made == [(2, bytes(range(128)), 0), (2, bytes(range(128)), 1)]   # the same id on both ranks
    assert [c.bootstrap.groups for c in comms[2:]] == [[[2, 3]], [[2, 3]]] and len(sent) == 1
    with pytest.raises(ValueError, match=r"nccl group: rank 2 asks for group \[0, 1\], which it is not in"):
        comms[2].group([0, 1])
