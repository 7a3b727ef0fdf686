"""What the scan kernels compile to, without a GPU: registers, spills, SASS opcode counts.

    python benchmarks/numba_sass.py --site /tmp/nbc [--out DIR]

Numba CUDA and nvcc compile the same algorithm (numba_cuda.py, selective_scan.cu) to
machine code (SASS) of very different lengths; counting the opcodes of each, side by
side, is how the Numba kernels' 2x gap was found (docs/kernels.md: Python's negative-index
test on every signed index). No GPU is needed: Numba's `compile_ptx`, then ptxas and
cuobjdump. Setup, once (one pip call: --target skips packages whose folder exists):

    pip install --target /tmp/nbc numba-cuda==0.30.4 nvidia-nvvm nvidia-cuda-nvrtc \\
        nvidia-cuda-nvcc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm

The nvcc column needs CUDA's nvcc on PATH (the CUDA C twin, at the launch shapes in use).
Counts are static (instructions in the code, not executed); the hot loops dominate both.
Each kernel's SASS text goes to runs/numba_sass/<kernel>_{numba,nvcc}.sass (or under --out).
"""
import argparse
import collections
import os
import re
import site
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def use_wheels(site_dir):
    """Make the pip-installed numba-cuda, NVVM and NVRTC importable and findable."""
    site.addsitedir(site_dir)  # runs numba-cuda's redirector .pth: numba.cuda -> numba_cuda
    libs = Path(site_dir) / "nvidia" / "cu13"
    fake_home = Path(tempfile.mkdtemp(prefix="cuda_home_"))  # CUDA_HOME layout numba-cuda expects
    (fake_home / "nvvm").mkdir()
    (fake_home / "lib64").symlink_to(libs / "lib")
    (fake_home / "nvvm" / "lib64").symlink_to(libs / "lib")
    os.environ["CUDA_HOME"] = str(fake_home)
    os.environ["PATH"] = f"{libs / 'bin'}{os.pathsep}{os.environ['PATH']}"  # cuobjdump calls nvdisasm
    return libs / "bin"


def sass_stats(cubin, cuobjdump, function=None):
    """(total instructions, Counter of opcodes) of one kernel in a cubin."""
    cmd = [str(cuobjdump), "-sass", *(["-fun", function] if function else []), str(cubin)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # .FTZ (flush denormals) is a modifier, not another operation: count FFMA.FTZ as FFMA
    ops = collections.Counter(m.group(1).replace(".FTZ", "")
                              for m in map(OPCODE.search, text.splitlines()) if m)
    return sum(ops.values()), ops, text


def ptxas_summary(stderr):
    keep = [line.strip() for line in stderr.splitlines() if "registers" in line or "spill" in line]
    return "; ".join(keep)


def numba_kernels():
    """(name, dispatcher, Numba signature, launch config) of both scan kernels, float32."""
    from numba import types
    from tinymoe.kernels.selective_scan import numba_cuda as nc
    f32 = types.float32
    a1, a2, a3, a4 = (types.Array(f32, n, "C") for n in (1, 2, 3, 4))
    flag = types.boolean
    fwd_cfg = nc.fit_config(None, nc.FWD_CONFIG, 16, 4, False)
    bwd_cfg = nc.fit_config(None, nc.BWD_CONFIG, 16, 4, True)
    shape = lambda c: (c["items"], c["warps"], c["nchunk"], c["min_blocks"])  # noqa: E731
    fwd = nc._kernels("<f4", *shape(fwd_cfg))[0]
    bwd = nc._kernels("<f4", *shape(bwd_cfg), False)[1]
    # fwd(u, delta, A, B, C, D, z, delta_bias, out, hs, has_D, has_z, has_bias, softplus, save)
    fwd_sig = (a3, a3, a2, a3, a3, a1, a3, a1, a3, a4) + (flag,) * 5
    # bwd(dout, u, delta, A, B, C, D, z, delta_bias, hs, du, ddelta, dz, dB_part, dC_part,
    #     dA_part, dD_part, dbias_part, has_D, has_bias, softplus)
    bwd_sig = (a3, a3, a3, a2, a3, a3, a1, a3, a1, a4, a3, a3, a3, a4, a4, a3, a2, a2) + (flag,) * 3
    return [("selective_scan_fwd", fwd, fwd_sig, fwd_cfg), ("selective_scan_bwd", bwd, bwd_sig, bwd_cfg)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--site", required=True, help="the pip --target folder of the setup above")
    p.add_argument("--out", default="runs/numba_sass",
                   help="folder for each kernel's <name>_{numba,nvcc}.sass (created; default %(default)s)")
    args = p.parse_args()
    bin_dir = use_wheels(args.site)
    sys.path.insert(0, str(REPO))
    from numba import cuda
    from tinymoe.kernels.selective_scan import cupy_raw
    work = Path(tempfile.mkdtemp(prefix="sass_"))
    for name, kernel, sig, cfg in numba_kernels():
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), fastmath=True,
                                  launch_bounds=(cfg["warps"] * 32, cfg["min_blocks"]))
        (work / f"{name}.ptx").write_text(ptx)
        run = subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90", "-v", str(work / f"{name}.ptx"),
                              "-o", str(work / f"{name}_numba.cubin")], capture_output=True, text=True)
        total_n, ops_n, text_n = sass_stats(work / f"{name}_numba.cubin", bin_dir / "cuobjdump")
        print(f"\n{name}, launch shape {cfg}")
        print(f"  Numba: {total_n} instructions; {ptxas_summary(run.stderr)}")
        total_c, ops_c, text_c = 0, collections.Counter(), ""
        cfg_c = cupy_raw.FWD_CONFIG if name.endswith("fwd") else cupy_raw.BWD_CONFIG
        try:
            opts = cupy_raw.nvcc_options("float32", cfg_c["items"], cfg_c["warps"], cfg_c["nchunk"],
                                         cfg_c["min_blocks"])
            subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "--std=c++17", *opts, str(cupy_raw.SOURCE),
                            "-o", str(work / "cuda_c.cubin")], capture_output=True, check=True)
            total_c, ops_c, text_c = sass_stats(work / "cuda_c.cubin", bin_dir / "cuobjdump", name)
            print(f"  nvcc:  {total_c} instructions at {cfg_c}"
                  + (" (both template instances: with and without z)" if name.endswith("bwd") else ""))
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"  nvcc:  not compiled ({type(err).__name__})")
        print(f"  {'opcode':22s} {'Numba':>6s} {'nvcc':>6s}")
        for op in sorted(set(ops_n) | set(ops_c), key=lambda o: -(ops_n[o] + ops_c[o]))[:25]:
            print(f"  {op:22s} {ops_n[op]:6d} {ops_c[op]:6d}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}_numba.sass").write_text(text_n)
        if text_c:
            (out / f"{name}_nvcc.sass").write_text(text_c)
        print(f"  SASS written to {out}/{name}_*.sass")


if __name__ == "__main__":
    main()
