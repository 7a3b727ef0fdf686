"""Run a function on N toy ranks from inside Python: `spawn(fn, 4)` or a reusable `ToyPool(4)`.

The command-line launcher (`launch.py`) starts scripts; this starts functions, which is
what notebooks and tests want. Each worker builds its ToyCommunicator once and then
runs `fn(comm, *args)` for every job it is sent, so the start-up cost (a new Python
process importing NumPy) is paid once per pool, not once per job.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import time
import traceback

from tinymoe.distributed.toy import DEFAULT_TIMEOUT, ToyCommunicator

GRACE = 2.0  # seconds the other ranks get to report once one rank has failed


def _worker(rank, world_size, peers, control, timeout):
    import tinymoe.distributed as dist

    comm = ToyCommunicator(rank, world_size, peers, timeout)
    dist.set_world(comm)  # so that dist.init() / get_world() inside jobs return this communicator
    while True:
        try:
            job = control.recv()
        except EOFError:  # the pool's owner went away
            break
        if job is None:
            break
        fn, args, kwargs = job
        try:
            reply = ("ok", fn(comm, *args, **kwargs))
        except BaseException as e:  # report everything, including KeyboardInterrupt
            reply = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        control.send(reply)
    comm.close()


def _default_start_method() -> str:
    # forkserver: forks from a clean server process (cheap, and safe with threads);
    # spawn where forkserver does not exist (Windows).
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class ToyPool:
    """`world_size` worker processes joined by a toy communicator, reused across `run` calls.

    pool = ToyPool(4)
    results = pool.run(fn, x)      # [fn(comm_0, x), ..., fn(comm_3, x)]
    pool.close()

    If a job fails on any rank, `run` raises RuntimeError with every failing rank's
    error and traceback, and the pool restarts its workers on the next `run` (a failed
    collective leaves the ranks out of step)."""

    def __init__(self, world_size: int, timeout: float = DEFAULT_TIMEOUT, start_method: str | None = None):
        if int(world_size) < 1:
            raise ValueError(f"ToyPool: world_size must be >= 1, got {world_size}")
        self.world_size = int(world_size)
        self.timeout = float(timeout)
        self.ctx = mp.get_context(start_method or _default_start_method())
        self.procs = None
        self.controls = None

    def start(self) -> None:
        n = self.world_size
        # one duplex pipe per pair of ranks: pipes[i][j] is rank i's end towards rank j
        pipes = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                pipes[i][j], pipes[j][i] = self.ctx.Pipe(duplex=True)
        self.controls, self.procs = [], []
        for rank in range(n):
            mine, theirs = self.ctx.Pipe(duplex=True)
            p = self.ctx.Process(target=_worker, args=(rank, n, pipes[rank], theirs, self.timeout),
                                 name=f"tinymoe-toy-rank{rank}", daemon=True)
            p.start()
            theirs.close()
            self.controls.append(mine)
            self.procs.append(p)
        for row in pipes:  # the workers hold their own copies now
            for conn in row:
                if conn is not None:
                    conn.close()

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """fn(comm, *args, **kwargs) on every rank; returns the list of results in rank order.

        fn must be importable by name (a module-level function). `timeout` bounds the
        whole job (None: no bound, the communicator's own timeout still applies)."""
        if self.procs is None:
            self.start()
        for c in self.controls:
            c.send((fn, args, kwargs))
        replies, errors = self._collect(timeout)
        if errors:
            self.close(force=True)
            raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on {len(errors)} of {self.world_size} "
                               "ranks:\n" + "\n".join(errors))
        return replies

    def _collect(self, timeout):
        """Wait for every rank's reply. Once one rank fails, the others get GRACE seconds
        (they are likely stuck in a collective with the failed rank), then are stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = dict(zip(self.controls, range(self.world_size)))
        replies, errors = [None] * self.world_size, []
        while waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if errors:
                left = GRACE if left is None else min(left, GRACE)
            ready = mp.connection.wait(list(waiting), left)
            if not ready:  # out of time
                why = "stopped after another rank failed" if errors else f"no result within {timeout:g} s (hung)"
                errors += [(r, why) for r in waiting.values()]
                break
            for c in ready:
                rank = waiting.pop(c)
                try:
                    reply = c.recv()
                except (EOFError, OSError):
                    self.procs[rank].join(1.0)
                    errors.append((rank, f"process exited (exit code {self.procs[rank].exitcode}) during the job"))
                    continue
                if reply[0] == "ok":
                    replies[rank] = reply[1]
                else:
                    errors.append((rank, f"{reply[1]}\n{reply[2]}"))
        return replies, [f"rank {r}: {e}" for r, e in sorted(errors)]

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely, or at once with force). The next `run` starts new ones."""
        if self.procs is None:
            return
        for c in self.controls:
            try:
                c.send(None)
            except OSError:
                pass
            c.close()
        for p in self.procs:
            p.join(0.0 if force else 2.0)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = self.controls = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def spawn(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
    """Start `world_size` toy ranks, run fn(comm, *args, **kwargs) on each, return the results."""
    with ToyPool(world_size, timeout=timeout) as pool:
        return pool.run(fn, *args, **kwargs)
