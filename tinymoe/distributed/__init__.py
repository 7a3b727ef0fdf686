"""Communicators (toy, MPI, NCCL), the all-to-all autograd Function, expert and data parallelism.

    import tinymoe.distributed as dist
    comm = dist.init()            # backend from the launcher: toy, mpi, or a world of one
    comm = dist.init("nccl")      # one process per GPU
"""
from __future__ import annotations

import atexit
import os

from tinymoe.distributed.communicator import Communicator, SingleProcess
from tinymoe.distributed.spawn import ToyPool, spawn
from tinymoe.distributed.toy import ToyCommunicator

BACKENDS = ("toy", "mpi", "nccl", "single")
_world: Communicator | None = None

# Environment variables that MPI launchers (MPICH/Hydra, Open MPI, Slurm's PMI) set.
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def _detect_backend() -> str:
    if os.environ.get("TINYMOE_BACKEND"):
        return os.environ["TINYMOE_BACKEND"]
    if "TINYMOE_TOY_PIPES" in os.environ:
        return "toy"
    if any(v in os.environ for v in _MPI_ENV):
        return "mpi"
    return "single"


def init(backend: str | None = None, world_size: int | None = None, timeout: float | None = None) -> Communicator:
    """Join the world of processes this one was started in, and return its communicator.

    backend: "toy" (started by `python -m tinymoe.distributed.launch`), "mpi" (started by
    `mpiexec`), "nccl" (one process per GPU, started by either), "single" (a world of one),
    or None to guess from the environment. world_size: if given, the number of processes
    the script needs; a launch with another number raises. Calling init again returns the
    same communicator."""
    global _world
    if _world is not None:
        if backend not in (None, _world.backend):
            raise RuntimeError(f"init: already initialized with backend {_world.backend!r}, asked for {backend!r}")
        return _check_size(_world, world_size)
    backend = backend or _detect_backend()
    if backend not in BACKENDS:
        raise ValueError(f"init: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "single":
        comm = SingleProcess()
    elif backend == "toy":
        comm = _toy_communicator(timeout)
    elif backend == "mpi":
        comm = _mpi_communicator()
    else:  # NCCL needs a first, host-side communicator to share its unique id
        from tinymoe.distributed.nccl import NCCLCommunicator
        mpi = any(v in os.environ for v in _MPI_ENV) and "TINYMOE_TOY_PIPES" not in os.environ
        comm = NCCLCommunicator(_mpi_communicator() if mpi else _toy_communicator(timeout))
    _world = comm
    return _check_size(comm, world_size)


def _toy_communicator(timeout):
    if "TINYMOE_TOY_PIPES" not in os.environ:
        raise RuntimeError("init('toy'): this process was not started by the toy launcher; run "
                           "python -m tinymoe.distributed.launch --nproc N script.py")
    comm = ToyCommunicator.from_env()
    if timeout is not None:
        comm.timeout = float(timeout)
    comm.barrier()  # everybody is here (a rank that died before init makes this raise)
    _notify_launcher(comm.rank)
    atexit.register(comm.close)  # unlink this rank's shared-memory mailboxes at exit
    return comm


def _mpi_communicator():
    try:
        from tinymoe.distributed.mpi import MPICommunicator
    except ImportError as e:
        raise RuntimeError("backend 'mpi' needs mpi4py and an MPI library: pip install 'tinymoe[mpi]' "
                           f"(import failed: {e})") from e
    return MPICommunicator()


def _check_size(comm: Communicator, world_size: int | None) -> Communicator:
    if world_size is not None and comm.world_size != world_size:
        raise RuntimeError(f"init: this script needs {world_size} processes but {comm.world_size} were started "
                           f"(backend {comm.backend!r}); launch it with --nproc {world_size} or mpiexec -n {world_size}")
    return comm


def _notify_launcher(rank: int) -> None:
    """Tell the launcher that this rank joined (so it can tell 'crashed at start' from 'failed later')."""
    fd = os.environ.get("TINYMOE_LAUNCH_FD")
    if fd is not None:
        os.write(int(fd), f"{rank}\n".encode())
        os.close(int(fd))
        del os.environ["TINYMOE_LAUNCH_FD"]


def get_world() -> Communicator:
    """The communicator of init(), initializing it on first use."""
    return _world if _world is not None else init()


def set_world(comm: Communicator | None) -> None:
    """Make `comm` the communicator get_world() returns (used by ToyPool workers and tests)."""
    global _world
    _world = comm


def is_initialized() -> bool:
    return _world is not None


__all__ = ["Communicator", "SingleProcess", "ToyCommunicator", "ToyPool", "spawn", "init", "get_world",
           "set_world", "is_initialized", "BACKENDS"]
