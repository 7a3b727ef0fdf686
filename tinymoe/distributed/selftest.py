"""Check a backend end to end:  mpiexec -n 2 python -m tinymoe.distributed.selftest --backend mpi

(or `python -m tinymoe.distributed.launch --nproc 4 -m tinymoe.distributed.selftest`,
or `--backend nccl` on GPUs). Every check is a function of a communicator that raises
AssertionError on a wrong answer; the tests run the same checks on the toy backend.
Every rank can predict what it should receive, because each chunk's content is a
function of (seed, sender, receiver) alone.
"""
from __future__ import annotations

import argparse

import numpy as np

from tinymoe.backend import to_numpy


def _chunk(seed, sender, receiver, row_shape, dtype):
    """The chunk `sender` sends to `receiver`: 0 to 4 rows (zero rows happen often)."""
    g = np.random.default_rng([seed, sender, receiver])
    rows = int(g.integers(0, 5))
    return (g.standard_normal((rows, *row_shape)) * 100).astype(dtype)


def check_all_to_all(comm, seed=0, device="cpu"):
    from tinymoe.backend import to_device
    for row_shape, dtype in [((3,), np.float32), ((), np.int64), ((2, 5), np.float64)]:
        send = [to_device(_chunk(seed, comm.rank, j, row_shape, dtype), device) for j in range(comm.world_size)]
        recv = comm.all_to_all(send)
        assert len(recv) == comm.world_size, f"got {len(recv)} chunks"
        for i, got in enumerate(recv):
            want = _chunk(seed, i, comm.rank, row_shape, dtype)
            got = to_numpy(got)
            assert got.dtype == want.dtype and got.shape == want.shape, \
                f"rank {comm.rank}: chunk from {i} is {got.dtype} {got.shape}, expected {want.dtype} {want.shape}"
            assert np.array_equal(got, want), f"rank {comm.rank}: wrong values from rank {i}"
        # the same exchange with the receive sizes given up front (counts already known)
        rows = [_chunk(seed, i, comm.rank, row_shape, dtype).shape[0] for i in range(comm.world_size)]
        again = comm.all_to_all(send, recv_rows=rows)
        assert all(np.array_equal(to_numpy(a), to_numpy(b)) for a, b in zip(again, recv))


def check_all_reduce(comm, device="cpu"):
    from tinymoe.backend import to_device
    n, r = comm.world_size, comm.rank
    x = to_device(np.arange(6, dtype=np.float64).reshape(2, 3) + 10 * r, device)
    base = np.arange(6, dtype=np.float64).reshape(2, 3)
    want = {"sum": n * base + 10 * n * (n - 1) / 2, "mean": base + 10 * (n - 1) / 2,
            "max": base + 10 * (n - 1), "min": base}
    for op, w in want.items():
        got = to_numpy(comm.all_reduce(x, op=op))
        assert np.allclose(got, w), f"rank {r}: all_reduce {op} gave {got}, expected {w}"
    assert np.array_equal(to_numpy(x), base + 10 * r), "all_reduce changed its input"


def check_broadcast(comm, device="cpu"):
    from tinymoe.backend import to_device
    root = comm.world_size - 1
    x = to_device(np.full((2, 2), comm.rank, np.float32), device)
    got = to_numpy(comm.broadcast(x, root=root))
    assert (got == root).all(), f"rank {comm.rank}: broadcast from {root} gave {got}"
    comm.barrier()


CHECKS = [check_all_to_all, check_all_reduce, check_broadcast]


def main(argv=None):
    import tinymoe.distributed as dist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default=None, help="toy, mpi or nccl (default: from the launcher)")
    a = p.parse_args(argv)
    comm = dist.init(a.backend)
    device = "cuda" if comm.backend == "nccl" else "cpu"
    for check in CHECKS + _layer_checks():
        check(comm, device=device) if "device" in check.__code__.co_varnames else check(comm)
        comm.barrier()
        if comm.rank == 0:
            print(f"selftest {comm.backend} x{comm.world_size}: {check.__name__} ok", flush=True)
    comm.close()


def _layer_checks():
    return []


if __name__ == "__main__":
    main()
