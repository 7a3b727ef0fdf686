"""The GPU selective-scan kernels (Numba CUDA, CuPy RawKernel) against the NumPy reference.

The Numba kernels run everywhere: on a machine without a GPU under Numba's simulator
(NUMBA_ENABLE_CUDASIM=1, in a fresh process because the simulator must be chosen before
numba.cuda is imported), with tiny launch shapes so that several tiles, several state
chunks and idle warps all occur at small sizes. On a GPU both kernels run at their real
launch shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe
from tinymoe.kernels.selective_scan import reference

# items per lane, warps per block, states per B/C chunk: tiles of 32 steps in the simulator
SIM_CONFIG = dict(items=1, warps=2, nchunk=2)
NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")


def make_inputs(batch, d_inner, L, N, opts, softplus, seed, xp=np, dtype=np.float64):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((batch, d_inner, L))
    delta = rng.standard_normal((batch, d_inner, L)) * 0.5
    if not softplus:
        delta = np.abs(delta) + 0.05  # the step must be positive without softplus
    A = -np.exp(rng.standard_normal((d_inner, N)) * 0.5)
    B = rng.standard_normal((batch, N, L))
    C = rng.standard_normal((batch, N, L))
    D = rng.standard_normal(d_inner) if "D" in opts else None
    z = rng.standard_normal((batch, d_inner, L)) if "z" in opts else None
    bias = rng.uniform(0.01, 0.1, d_inner) if "b" in opts else None
    dout = rng.standard_normal((batch, d_inner, L))
    cast = lambda x: None if x is None else xp.asarray(x, dtype=dtype)  # noqa: E731
    return [cast(x) for x in (dout, u, delta, A, B, C, D, z, bias)]


def check_against_reference(module, shape, opts, softplus, seed, config, dtype, rtol):
    """fwd and all eight gradients of `module` equal the float64 reference."""
    xp = np if module.__name__.endswith("numba_cuda") and not tinymoe.cuda_available() \
        else tinymoe.backend.cupy()
    ref_in = make_inputs(*shape, opts, softplus, seed)
    args = make_inputs(*shape, opts, softplus, seed, xp=xp, dtype=dtype)
    out, states = module.selective_scan_fwd(*args[1:], delta_softplus=softplus, config=config,
                                            return_states=True)
    want = reference.selective_scan_fwd(*ref_in[1:], delta_softplus=softplus)
    np.testing.assert_allclose(tinymoe.backend.to_numpy(out), want, rtol=rtol, atol=rtol,
                               err_msg=f"out {shape} {opts}")
    got = module.selective_scan_bwd(*args, delta_softplus=softplus, config=config, states=states)
    want = reference.selective_scan_bwd(*ref_in, delta_softplus=softplus)
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        g = tinymoe.backend.to_numpy(g)
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g / scale, w / scale, rtol=rtol, atol=rtol,
                                   err_msg=f"{name} {shape} {opts}")


def _numba_cases(cases):
    from tinymoe.kernels.selective_scan import numba_cuda
    for shape, opts, softplus, config in cases:
        check_against_reference(numba_cuda, tuple(shape), opts, softplus, 0,
                                dict(SIM_CONFIG, **config), np.float64, 1e-10)


def run_in_simulator(fn, *args):
    """fn(*args) from this file in a fresh interpreter with the CUDA simulator on."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t.{fn.__name__}(*{args!r})")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_numba_cuda_scan_in_simulator():
    # two tiles (L=40 > 32), a chunk loop (N=3 > 2), an idle warp (d_inner=3, 2 warps),
    # all options; then L = 1, batch 1, N = 1 with no options and a positive delta; then
    # 2 items per lane (a pad word inside the staged rows) with 1 warp, whose threads each
    # sum 4 of the block's 128 dB/dC entries; then 3 warps (96 threads for 128 entries:
    # some threads' second entry is past the end, and a warp sums dB in its first entry and
    # dC in its second) over two blocks, the second with two idle warps, and a partial tile
    run_in_simulator(_numba_cases, [
        ((1, 3, 40, 3), "Dzb", True, {}),
        ((1, 1, 1, 1), "", False, {}),
        ((2, 1, 5, 2), "z", True, dict(items=2, warps=1)),
        ((1, 4, 100, 3), "Dzb", True, dict(items=2, warps=3)),
    ])


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("N", [1, 16, 64, 256])
def test_cuda_c_backward_shape_fits_shared_memory(N, itemsize):
    """The CUDA C backward keeps 32 dA sums per state and warp where the block fits with
    them (float32 at Mamba's N = 16, the benchmark's shape), one per state beyond; either
    way the block's shared memory stays within what a Hopper block can opt into."""
    from tinymoe.kernels.selective_scan import cupy_raw
    cfg = cupy_raw.bwd_config(None, N, itemsize)
    assert cupy_raw.smem_bytes(cfg, N, itemsize, True) <= cupy_raw.SMEM_OPT_IN
    if (N, itemsize) == (16, 4):
        assert cfg == cupy_raw.BWD_CONFIG  # da_lanes 32, the swept shape unchanged
    if N >= 64:
        assert cfg["da_lanes"] == 1
    with pytest.raises(ValueError, match="items=3 must divide 32"):
        cupy_raw.nvcc_options(np.float32, 3, 16, 8)


# ------------------------------------------------------------------------ on a GPU
GPU_CASES = [
    ((2, 37, 300, 5), "Dzb", True),    # d_inner, L not multiples of the block / tile
    ((1, 1, 1, 1), "", False),         # L = 1, batch 1, N = 1
    ((3, 8, 700, 40), "Db", True),     # N above the B/C chunk: several chunks
    ((1, 5, 2049, 16), "z", True),     # Mamba's N, one step into a new tile
    ((2, 9, 600, 64), "Db", True),     # float32 with several B/C chunks and dA summed per state
]


def _gpu_module(name):
    from tinymoe.kernels.selective_scan import cupy_raw, numba_cuda
    return {"numba_cuda": numba_cuda, "cupy": cupy_raw}[name]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
@pytest.mark.parametrize("shape,opts,softplus", GPU_CASES)
def test_gpu_scan_matches_reference_float64(impl, shape, opts, softplus):
    check_against_reference(_gpu_module(impl), shape, opts, softplus, 1, None, np.float64, 1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
@pytest.mark.parametrize("shape,opts,softplus", GPU_CASES[:1] + GPU_CASES[3:])
def test_gpu_scan_float32(impl, shape, opts, softplus):
    check_against_reference(_gpu_module(impl), shape, opts, softplus, 2, None, np.float32, 2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
def test_gpu_scan_backward_is_deterministic(impl):
    module = _gpu_module(impl)
    args = make_inputs(2, 64, 1500, 16, "Dzb", True, 3, xp=tinymoe.backend.cupy(),
                       dtype=np.float32)
    first = module.selective_scan_bwd(*args, delta_softplus=True)
    for _ in range(3):
        again = module.selective_scan_bwd(*args, delta_softplus=True)
        for name, g, h in zip(NAMES, first, again):
            assert bool((g == h).all()), f"{impl}: {name} changed between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
def test_gpu_backward_without_the_forwards_states_recomputes_them(impl):
    """The backward from the forward's tile-start states, from none, and from states of
    another tiling (ignored, recomputed): the same bits."""
    module = _gpu_module(impl)
    args = make_inputs(2, 20, 1100, 16, "Dzb", True, 5, xp=tinymoe.backend.cupy(),
                       dtype=np.float32)
    _, states = module.selective_scan_fwd(*args[1:], delta_softplus=True, return_states=True)
    _, other = module.selective_scan_fwd(*args[1:], delta_softplus=True, return_states=True,
                                         config=dict(items=4, warps=4, nchunk=4))
    assert states.hs.shape == (2, 20, 5, 16) and other.items == 4
    want = module.selective_scan_bwd(*args, delta_softplus=True, states=states)
    for given in (None, other):
        got = module.selective_scan_bwd(*args, delta_softplus=True, states=given)
        for name, g, w in zip(NAMES, got, want):
            assert bool((g == w).all()), f"{impl}: {name} differs with states={given}"


@pytest.mark.gpu
def test_gpu_default_impl_is_a_kernel():
    from tinymoe.kernels import selective_scan as ss
    args = make_inputs(1, 4, 50, 3, "D", True, 4, xp=tinymoe.backend.cupy(), dtype=np.float32)
    out = ss.selective_scan_fwd(*args[1:], delta_softplus=True)
    want = ss.selective_scan_fwd(*args[1:], delta_softplus=True, impl="reference")
    assert ss._impl(None, args[1]).__name__.endswith(("cupy_raw", "numba_cuda"))
    np.testing.assert_allclose(out.get(), want.get(), rtol=1e-4, atol=1e-4)
