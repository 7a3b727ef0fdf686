"""The CUDA C sources of the CuPy kernels compile with the machine's nvcc (for Hopper,
in every configuration the wrappers use), so a syntax error shows up in CI without a GPU."""
import re
import shutil
import subprocess

import numpy as np
import pytest

from tinymoe.kernels.dispatch import cupy_raw as dispatch_raw
from tinymoe.kernels.selective_scan import cupy_raw as scan_raw

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")


def compile_cubin(source, options, tmp_path):
    out = tmp_path / "k.cubin"
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
                          "-Xptxas", "-v", *options, "-o", str(out), str(source)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0
    return res.stderr  # ptxas's resource report


def stack_bytes(report, kernel):
    """The stack frame ptxas reports for `kernel` (local memory: spills, indexed arrays)."""
    after = report.split(f"Compiling entry function '{kernel}'")[1]
    return int(re.search(r"(\d+) bytes stack frame", after).group(1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel,config,extra", [
    ("selective_scan_fwd", "FWD_CONFIG", {}),
    ("selective_scan_bwd", "BWD_CONFIG", {}),
    ("selective_scan_bwd", "BWD_CONFIG", dict(da_lanes=1)),  # large N: dA summed per state
])
def test_selective_scan_cu_compiles(dtype, kernel, config, extra, tmp_path):
    cfg = dict(getattr(scan_raw, config), **extra)
    report = compile_cubin(scan_raw.SOURCE, scan_raw.nvcc_options(dtype, **cfg), tmp_path)
    if dtype == np.float32:  # the per-lane arrays stay in registers: at most a few
        assert stack_bytes(report, kernel) <= 64, report  # scalars spill under the cap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dispatch_cu_compiles(dtype, tmp_path):
    report = compile_cubin(dispatch_raw.SOURCE, dispatch_raw.nvcc_options(dtype), tmp_path)
    for kernel in ("count_chunks", "assign_rows", "permute_rows", "combine_rows", "slot_dot"):
        assert kernel in report
