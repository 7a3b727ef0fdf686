"""Start N toy ranks of a script:  python -m tinymoe.distributed.launch --nproc 4 script.py args...

Like `torchrun` or `mpiexec`, for the toy backend. The launcher
  1. opens one duplex pipe per pair of ranks (a socketpair),
  2. starts N copies of the script, each told its rank, the world size and which
     file descriptors lead to which peer (environment variables TINYMOE_*),
  3. watches them: when one fails, it stops the others and exits with its code (a rank
     stopped by SIGTERM or SIGINT, exit 143 / 130, has saved and is not a failure: the
     others stop at the same step, and the launcher exits with that code),
     saying whether that rank had joined the world (called tinymoe.distributed.init())
     or died before, so "only 3 of 4 processes started" is never a silent hang.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import time

from tinymoe.distributed.toy import DEFAULT_TIMEOUT

STOPPED = (130, 143)   # a rank's exit code after SIGINT / SIGTERM: it saved and stopped, not failed


# "my index among the processes of this host", as each launcher says it: this one, MPICH's Hydra,
# Open MPI, Slurm's srun. NCCL ranks pick their GPU with it (several hosts: ranks 8-15 are GPUs 0-7).
LOCAL_RANK_ENV = ("TINYMOE_LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def local_rank(default: int) -> int:
    """This process's rank among those of its host (from the launcher's environment), else default."""
    for name in LOCAL_RANK_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return default


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinymoe.distributed.launch",
                                description="Start N processes joined by the toy communicator.")
    p.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for a peer before raising (default %(default)s)")
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER,
                   help="run a module (like python -m) instead of a script: -m module args...")
    p.add_argument("script", nargs="?", help="the script to run in every process")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    a = p.parse_args(argv)
    if a.nproc < 1:
        p.error(f"--nproc must be at least 1, got {a.nproc}")
    if a.module:  # with -m, everything after the module's name is its arguments
        a.module, a.args = a.module[0], a.module[1:]
    elif a.script is None:
        p.error("give a script (or -m module) to run")
    elif not os.path.isfile(a.script):
        p.error(f"script {a.script!r} not found")
    return a


def start_workers(a):
    """Steps 1 and 2: the pipes, then the processes. Returns (procs, joined-pipe read ends)."""
    n = a.nproc
    pipes = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            pipes[i][j], pipes[j][i] = socket.socketpair()
    command = [sys.executable, "-m", a.module] if a.module else [sys.executable, a.script]
    procs, joined = [], []
    for rank in range(n):
        fds = [pipes[rank][j].fileno() if j != rank else -1 for j in range(n)]
        joined_r, joined_w = os.pipe()  # the rank writes its number here once init() succeeds
        env = dict(os.environ, TINYMOE_RANK=str(rank), TINYMOE_WORLD_SIZE=str(n), TINYMOE_LOCAL_RANK=str(rank),
                   TINYMOE_TOY_PIPES=",".join(map(str, fds)), TINYMOE_LAUNCH_FD=str(joined_w),
                   TINYMOE_TIMEOUT=str(a.timeout))
        procs.append(subprocess.Popen(command + a.args, env=env, pass_fds=[f for f in fds if f >= 0] + [joined_w]))
        os.close(joined_w)
        joined.append(joined_r)
    for row in pipes:  # only the workers hold pipe ends now: a dead worker's peers see end-of-file
        for s in row:
            if s is not None:
                s.close()
    return procs, joined


def watch(procs, joined_fds) -> int:
    """Step 3: wait for all; on the first failure stop the rest. Returns the exit code."""
    n = len(procs)
    joined, open_fds = set(), {fd: rank for rank, fd in enumerate(joined_fds)}
    while True:
        if open_fds:  # collect "I joined" notes (or end-of-file from ranks that exited)
            ready, _, _ = select.select(list(open_fds), [], [], 0.05)
            for fd in ready:
                if os.read(fd, 64).strip():
                    joined.add(open_fds[fd])
                os.close(fd)
                del open_fds[fd]
        else:
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0, *STOPPED)]
        if not failed and all(c is not None for c in codes) and any(c in STOPPED for c in codes):
            return max(codes)         # every rank stopped by a signal, after saving together
        if failed:
            r = failed[0]
            if r not in joined:
                print(f"launch: only {len(joined)} of {n} processes started: rank {r} exited with code {codes[r]} "
                      "before joining the world (tinymoe.distributed.init()); see its error above. "
                      f"Stopping the other {n - 1}.", file=sys.stderr)
            else:
                print(f"launch: rank {r} failed with exit code {codes[r]}; stopping the other ranks.", file=sys.stderr)
            stop(procs)
            return codes[r]
        if all(c == 0 for c in codes):
            return 0


def stop(procs, grace: float = 30.0) -> None:
    """SIGTERM to every rank still running: each finishes its step and saves (the ranks save
    together); after `grace` seconds the ones left are killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    a = parse_args(argv)
    procs, joined = start_workers(a)
    # `kill` / `timeout` send SIGTERM to the launcher: pass it on, leave no orphans behind
    signal.signal(signal.SIGTERM, lambda *_: (stop(procs), sys.exit(143)))
    try:
        return watch(procs, joined)
    except KeyboardInterrupt:
        stop(procs)
        return 130


if __name__ == "__main__":
    sys.exit(main())
