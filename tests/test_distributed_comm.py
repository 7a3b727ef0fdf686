"""Communicators: the toy backend in a shared pool of processes, the launcher, MPI through mpiexec."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import tinymoe.distributed as dist
from tinymoe.distributed import ToyCommunicator, ToyPool, selftest
from tinymoe.distributed.communicator import SingleProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=[2, 4], ids=["toy2", "toy4"])
def pool(request):
    p = ToyPool(request.param, timeout=20)
    yield p
    p.close()


# ---------------------------------------------------------------- collectives on the toy backend
def test_all_to_all_uneven_and_empty_chunks(pool):
    for seed in range(3):
        pool.run(selftest.check_all_to_all, seed)


def test_all_to_all_rows_equals_the_list_form(pool):
    # one buffer in, one out (uneven, zero and all-empty row counts; strided input) == list form
    for seed in range(3):
        pool.run(selftest.check_all_to_all_rows, seed)


def _rows_big(comm):
    # past the toy backend's eager limit, through the base class's split / concatenate
    W, r = comm.world_size, comm.rank
    send_rows = [1000 * (r + 1) * (j + 1) % 7001 for j in range(W)]
    x = np.arange(sum(send_rows) * 16, dtype=np.float32).reshape(-1, 16) + 1e6 * r
    recv_rows = [1000 * (i + 1) * (r + 1) % 7001 for i in range(W)]
    y = comm.all_to_all_rows(x, send_rows, recv_rows)
    want = np.concatenate([c for c in comm.all_to_all(np.split(x, np.cumsum(send_rows)[:-1]), recv_rows)])
    return y.shape, np.array_equal(y, want)


def test_all_to_all_rows_large_messages(pool):
    for shape, equal in pool.run(_rows_big):
        assert equal and shape[1] == 16


def test_all_to_all_rows_bad_counts_are_clear_errors():
    comm = ToyCommunicator(0, 3, [None, None, None])
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"toy all_to_all: send_rows has 2 entries but the world has 3 ranks"):
        comm.all_to_all_rows(x, [2, 2])
    with pytest.raises(ValueError, match=r"send_rows \[1, 1, 1\] add up to 3 rows but x has shape \(4, 2\)"):
        comm.all_to_all_rows(x, [1, 1, 1])
    with pytest.raises(ValueError, match="negative counts"):
        comm.all_to_all_rows(x, [5, -1, 0])
    with pytest.raises(ValueError, match="recv_rows has 1 entries, expected 3"):
        comm.all_to_all_rows(x, [2, 1, 1], recv_rows=[1])
    with pytest.raises(ValueError, match="rank 0 sends itself 2 rows but recv_rows says 0"):
        comm.all_to_all_rows(x, [2, 1, 1], recv_rows=[0, 1, 1])
    with pytest.raises(TypeError, match="x must be an array with at least one dimension"):
        comm.all_to_all_rows(np.float32(1.0), [1, 0, 0])


def test_single_process_all_to_all_rows_is_a_copy():
    comm = SingleProcess()
    x = np.arange(6.0).reshape(3, 2)
    y = comm.all_to_all_rows(x, [3], [3])
    assert np.array_equal(y, x) and y is not x
    with pytest.raises(ValueError, match="send_rows has 2 entries but the world has 1 ranks"):
        comm.all_to_all_rows(x, [1, 2])


def test_large_messages_through_the_mailboxes(pool):
    pool.run(selftest.check_large_messages)


def test_all_reduce_ops(pool):
    pool.run(selftest.check_all_reduce)


def test_broadcast_and_barrier(pool):
    pool.run(selftest.check_broadcast)


def _all_reduce_bits(comm):
    x = np.random.default_rng(comm.rank).standard_normal(1000).astype(np.float32)
    return comm.all_reduce(x).tobytes()


def test_all_reduce_gives_identical_bits_on_every_rank(pool):
    out = pool.run(_all_reduce_bits)
    assert all(o == out[0] for o in out)


def _bytes_sent(comm):
    before = comm.bytes_sent
    comm.all_to_all([np.zeros((j + 1, 4), np.float32) for j in range(comm.world_size)])
    return comm.bytes_sent - before


def test_bytes_sent_counts_only_other_ranks(pool):
    n = pool.world_size
    got = pool.run(_bytes_sent)
    for r in range(n):
        assert got[r] == sum((j + 1) * 16 for j in range(n) if j != r)


def _init_returns_pool_comm(comm):
    return dist.init() is comm and dist.get_world() is comm


def test_init_inside_a_worker_returns_its_communicator(pool):
    assert all(pool.run(_init_returns_pool_comm))


# ---------------------------------------------------------------- bad input
def test_mismatched_chunk_count_is_a_clear_error():
    comm = ToyCommunicator(0, 3, [None, None, None])
    with pytest.raises(ValueError, match=r"toy all_to_all: got 2 chunks but the world has 3 ranks"):
        comm.all_to_all([np.zeros(2), np.zeros(2)])
    with pytest.raises(TypeError, match="send_chunks must be a list of 3 arrays"):
        comm.all_to_all(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"chunk 1 has dtype float32 and shape \(2, 4\), but chunk 0 has dtype "
                                         r"float32 and shape \(1, 3\)"):
        comm.all_to_all([np.zeros((1, 3), np.float32), np.zeros((2, 4), np.float32), np.zeros((0, 3), np.float32)])
    with pytest.raises(ValueError, match="recv_rows has 1 entries, expected 3"):
        comm.all_to_all([np.zeros(1)] * 3, recv_rows=[1])
    with pytest.raises(ValueError, match="unknown reduce op 'prod'"):
        comm.all_reduce(np.zeros(2), op="prod")


def test_single_process_world_is_the_identity():
    comm = SingleProcess()
    x = np.arange(6.0).reshape(3, 2)
    (y,) = comm.all_to_all([x])
    assert np.array_equal(y, x) and y is not x
    assert np.array_equal(comm.all_reduce(x, "mean"), x)
    with pytest.raises(ValueError, match="got 2 chunks but the world has 1 ranks"):
        comm.all_to_all([x, x])


def test_unknown_backend_and_world_size_mismatch(monkeypatch):
    monkeypatch.setattr(dist, "_world", None)
    with pytest.raises(ValueError, match="unknown backend 'gloo'"):
        dist.init("gloo")
    with pytest.raises(RuntimeError, match="needs 4 processes but 1 were started"):
        dist.init("single", world_size=4)
    monkeypatch.setattr(dist, "_world", None)
    monkeypatch.delenv("TINYMOE_TOY_PIPES", raising=False)
    with pytest.raises(RuntimeError, match="not started by the toy launcher"):
        dist.init("toy")


def test_backend_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(dist, "_world", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now fails
    monkeypatch.delitem(sys.modules, "tinymoe.distributed.mpi", raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'mpi' needs mpi4py .*pip install 'tinymoe\[mpi\]'"):
        dist.init("mpi")
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    monkeypatch.delitem(sys.modules, "tinymoe.distributed.nccl", raising=False)
    with pytest.raises(ImportError, match=r"backend 'nccl' needs CuPy with NCCL: pip install 'tinymoe\[cuda12\]'"):
        import tinymoe.distributed.nccl  # noqa: F401


# ---------------------------------------------------------------- dead and hung peers
def _one_rank_dies(comm):
    if comm.rank == 1:
        os._exit(7)
    comm.recv(1, "all_to_all")


def _one_rank_hangs(comm):
    comm.timeout = 0.3
    if comm.rank == 1:
        time.sleep(1.0)
        return
    comm.recv(1, "all_to_all")


def test_dead_peer_raises_at_once():
    with ToyPool(2, timeout=30) as pool:
        t = time.monotonic()
        with pytest.raises(RuntimeError, match=r"(?s)rank 0: RuntimeError: toy all_to_all: rank 0 lost rank 1: "
                                               r"its process exited.*rank 1: process exited \(exit code 7\)"):
            pool.run(_one_rank_dies)
        assert time.monotonic() - t < 10  # not the 30 s timeout


def test_hung_peer_raises_after_the_timeout():
    with ToyPool(2) as pool:
        with pytest.raises(RuntimeError, match=r"rank 0 waited 0.3 s for rank 1, which is alive but sent nothing"):
            pool.run(_one_rank_hangs)


# ---------------------------------------------------------------- the launcher
def _launch(tmp_path, body, nproc, *args, timeout=60):
    script = tmp_path / "worker.py"
    script.write_text(body)
    return subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", str(nproc),
                           str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_launcher_runs_the_selftest():
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "3", "-m",
                          "tinymoe.distributed.selftest", "--backend", "toy"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "selftest toy x3: check_all_to_all ok" in out.stdout


def test_launcher_reports_a_rank_that_never_started(tmp_path):
    body = ("import os, sys\nif os.environ['TINYMOE_RANK'] == '2':\n    sys.exit(5)\n"
            "import tinymoe.distributed as dist\ndist.init().barrier()\n")
    out = _launch(tmp_path, body, 3)
    assert out.returncode == 5
    # ranks 0 and 1 cannot join either: init() waits for everybody
    assert "only 0 of 3 processes started: rank 2 exited with code 5 before joining" in out.stderr, out.stderr


def test_launcher_stops_the_others_when_a_rank_fails(tmp_path):
    body = ("import time, tinymoe.distributed as dist\ncomm = dist.init()\n"
            "if comm.rank == 0:\n    raise SystemExit(4)\ntime.sleep(60)\n")
    t = time.monotonic()
    out = _launch(tmp_path, body, 2)
    assert out.returncode == 4 and "rank 0 failed with exit code 4" in out.stderr, out.stderr
    assert time.monotonic() - t < 30


def test_launcher_argument_errors(tmp_path):
    out = _launch(tmp_path, "", 0)
    assert out.returncode == 2 and "--nproc must be at least 1, got 0" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "missing.py"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "script 'missing.py' not found" in out.stderr


# ---------------------------------------------------------------- MPI, really run (mpi4py + mpich wheels)
def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


@pytest.mark.mpi
def test_mpi_selftest_with_mpiexec():
    pytest.importorskip("mpi4py", reason="the dev extra installs mpi4py; without it there is no MPI to test")
    assert mpiexec() is not None, "mpi4py is installed but no mpiexec was found (pip install mpich)"
    out = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "tinymoe.distributed.selftest",
                          "--backend", "mpi"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("check_all_to_all", "check_all_to_all_rows", "check_large_messages", "check_all_reduce",
                  "check_broadcast", "check_all_to_all_grad", "check_expert_parallel", "check_data_parallel",
                  "check_zero"):
        assert f"selftest mpi x2: {check} ok" in out.stdout, out.stdout


def test_launcher_passes_sigterm_on(tmp_path):
    import signal

    body = ("import os, time, tinymoe.distributed as dist\ncomm = dist.init()\n"
            f"p = r'{tmp_path}/pid%d' % comm.rank\nopen(p + '.tmp', 'w').write(str(os.getpid()))\n"
            "os.rename(p + '.tmp', p)\ntime.sleep(60)\n")
    (tmp_path / "worker.py").write_text(body)
    launcher = subprocess.Popen([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2",
                                 str(tmp_path / "worker.py")], cwd=ROOT)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("pid[0-9]"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid[0-9]")]
    assert len(pids) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(30) == 143
    for pid in pids:  # the workers are gone too (no orphans)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
