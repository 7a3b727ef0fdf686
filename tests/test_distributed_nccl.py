"""The NCCL backend on real GPUs (run on the device machine): the whole selftest, one process per GPU."""
import os
import subprocess
import sys

import pytest

import tinymoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.gpu
def test_nccl_selftest_one_process_per_gpu():
    import cupy

    nproc = min(2, cupy.cuda.runtime.getDeviceCount())
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # never NVLink multicast on shared machines
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", str(nproc), "-m",
                          "tinymoe.distributed.selftest", "--backend", "nccl"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("check_all_to_all", "check_all_to_all_rows", "check_large_messages", "check_all_reduce",
                  "check_broadcast", "check_all_to_all_grad", "check_expert_parallel", "check_data_parallel",
                  "check_zero"):
        assert f"selftest nccl x{nproc}: {check} ok" in out.stdout, out.stdout


@pytest.mark.gpu
def test_nccl_all_to_all_rows_on_two_gpus():
    """The single-buffer path (one grouped send/recv on pointer offsets into x and y) equals the
    list path on 2 GPUs, with uneven, zero and all-empty row counts and a strided input; the
    expert-parallel layer, which uses it, equals one process."""
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-m", "tinymoe.distributed.launch", "--nproc", "2", "-m",
                          "tinymoe.distributed.selftest", "--backend", "nccl",
                          "--only", "check_all_to_all_rows,check_all_to_all_grad,check_expert_parallel"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("check_all_to_all_rows", "check_all_to_all_grad", "check_expert_parallel"):
        assert f"selftest nccl x2: {check} ok" in out.stdout, out.stdout


def test_nccl_without_cupy_says_which_extra(monkeypatch):
    if tinymoe.cuda_available():
        pytest.skip("CuPy is installed here: the missing-CuPy message cannot be provoked")
    import tinymoe.distributed as dist

    monkeypatch.setattr(dist, "_world", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    monkeypatch.delitem(sys.modules, "tinymoe.distributed.nccl", raising=False)
    monkeypatch.setenv("TINYMOE_TOY_PIPES", "")  # would be set by the launcher; never reached
    with pytest.raises(ImportError, match=r"backend 'nccl' needs CuPy with NCCL: pip install 'tinymoe\[cuda12\]'"):
        dist.init("nccl")
