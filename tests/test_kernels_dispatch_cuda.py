"""The GPU dispatch/combine kernels (Numba CUDA, CuPy RawKernel) against the NumPy reference.

Cases: an expert with no tokens, all tokens to one expert, more experts than tokens, one
token, capacity drops (and capacity 0), empty slots (negative expert index). The Numba
kernels run under the simulator in a fresh process on machines without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe
from tinymoe.kernels.dispatch import reference

PLAN_FIELDS = ("counts", "offsets", "slot_row", "row_token", "row_slot")

# (T, k, E, capacity, d, how the experts are drawn)
CASES = [
    (7, 2, 3, 2, 5, "random"),        # capacity drops
    (1, 1, 4, None, 3, "random"),     # one token, more experts than tokens
    (9, 2, 5, None, 2, "one"),        # all tokens to expert 0, others empty
    (6, 3, 4, 0, 2, "random"),        # capacity 0: everything dropped
    (8, 2, 6, 3, 4, "holes"),         # empty slots (-1) and an unused expert
]


def make_case(T, k, E, capacity, d, how, seed, xp=np, dtype=np.float64):
    rng = np.random.default_rng(seed)
    if how == "one":
        ei = np.zeros((T, k), np.int64)
        ei[:, 1:] = rng.integers(1, E, (T, k - 1))
    else:
        ei = rng.integers(0, E - (how == "holes"), (T, k))
    if how == "holes":
        ei[rng.random((T, k)) < 0.3] = -1
    x, w, dout = (rng.standard_normal(s) for s in ((T, d), (T, k), (T, d)))
    return [xp.asarray(a) for a in (ei,)] + [xp.asarray(a, dtype) for a in (x, w, dout)]


def check_against_reference(module, case, seed, xp, dtype, rtol, static=False):
    T, k, E, capacity, d, how = case
    ei, x, w, dout = make_case(*case, seed, xp=xp, dtype=dtype)
    host = lambda a: tinymoe.backend.to_numpy(a)  # noqa: E731
    ref_in = [host(a) for a in (ei, x, w, dout)]
    if static == "dropless":                      # T k rows, the bounds on the device only
        plan = module.make_static_plan(ei, E, None)
        want = reference.make_static_plan(ref_in[0], E, None)
        assert plan.static and plan.bounds is None and plan.num_rows == T * k
    elif static:                                  # C rows per expert (capacity None: T k)
        capacity = max(capacity or T * k, 1)
        plan = module.make_static_plan(ei, E, capacity)
        want = reference.make_static_plan(ref_in[0], E, capacity)
        assert plan.static and plan.bounds == want.bounds == tuple(range(0, E * capacity + 1, capacity))
    else:
        plan = module.make_dispatch_plan(ei, E, capacity)
        want = reference.make_dispatch_plan(ref_in[0], E, capacity)
    for f in PLAN_FIELDS:
        np.testing.assert_array_equal(host(getattr(plan, f)), getattr(want, f), err_msg=f"{f} {case}")
    xs = module.permute(x, plan)
    np.testing.assert_allclose(host(xs), reference.permute(ref_in[1], want), rtol=rtol)
    ys = xs * 1.5 + 0.25  # stand-in expert outputs
    ys_ref = host(ys)
    np.testing.assert_allclose(host(module.permute_backward(ys, plan, T)),
                               reference.permute_backward(ys_ref, want, T), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(host(module.combine(ys, w, plan)),
                               reference.combine(ys_ref, ref_in[2], want), rtol=rtol, atol=rtol)
    got = module.combine_backward(dout, ys, w, plan)
    exp = reference.combine_backward(ref_in[3], ys_ref, ref_in[2], want)
    for name, g, e in zip(("dys", "dweights"), got, exp):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(host(g), e, rtol=rtol, atol=rtol, err_msg=f"{name} {case}")


def _numba_cases(cases, static=False):
    from tinymoe.kernels.dispatch import numba_cuda
    numba_cuda.THREADS = 32  # one warp per row block: the simulator runs a Python thread each
    for case in cases:
        check_against_reference(numba_cuda, tuple(case), 0, np, np.float64, 1e-12, static)


def run_in_simulator(fn, *args):
    """fn(*args) from this file in a fresh interpreter with the CUDA simulator on."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t.{fn.__name__}(*{args!r})")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_numba_cuda_dispatch_in_simulator():
    run_in_simulator(_numba_cases, CASES)


def test_numba_cuda_static_dispatch_in_simulator():
    run_in_simulator(_numba_cases, CASES, True)


def test_numba_cuda_dropless_static_dispatch_in_simulator():
    run_in_simulator(_numba_cases, CASES, "dropless")


def test_numba_cuda_dispatch_rejects_bad_input():
    from tinymoe.kernels.dispatch import numba_cuda
    with pytest.raises(ValueError, match=r"make_dispatch_plan: expert_index must be \(T, k\)"):
        numba_cuda.make_dispatch_plan(np.zeros(3, np.int64), 2)
    with pytest.raises(ValueError, match="expert index 5 out of range for num_experts=2"):
        numba_cuda.make_dispatch_plan(np.full((2, 1), 5), 2)
    plan = reference.make_dispatch_plan(np.zeros((2, 1), np.int64), 2)
    with pytest.raises(ValueError, match="combine: weights shape"):
        numba_cuda.combine(np.zeros((2, 3)), np.zeros((3, 1)), plan)
    with pytest.raises(ValueError, match="permute: x has 5 tokens, plan has 2"):
        numba_cuda.permute(np.zeros((5, 3)), plan)


# ------------------------------------------------------------------------ on a GPU
def _gpu_module(name):
    from tinymoe.kernels.dispatch import cupy_raw, numba_cuda
    return {"numba_cuda": numba_cuda, "cupy": cupy_raw}[name]


GPU_CASES = CASES + [(1000, 2, 8, 300, 130, "random"), (4097, 1, 64, None, 33, "holes"),
                     (513, 4, 3, 200, 64, "random")]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_dispatch_matches_reference(impl, dtype, case):
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    check_against_reference(_gpu_module(impl), case, 1, tinymoe.backend.cupy(), dtype, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["numba_cuda", "cupy"])
@pytest.mark.parametrize("static", [True, "dropless"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_static_dispatch_matches_reference(impl, case, static):
    check_against_reference(_gpu_module(impl), case, 1, tinymoe.backend.cupy(), np.float32, 1e-5, static)


@pytest.mark.gpu
def test_gpu_dispatch_default_impl_is_a_kernel():
    from tinymoe.kernels import dispatch
    ei = tinymoe.backend.cupy().asarray([[0, 1], [1, 0]])
    assert dispatch._impl(None, ei).__name__.endswith(("cupy_raw", "numba_cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_row_kernels_take_rows_that_are_not_16_byte_aligned(dtype):
    """The CUDA C row kernels move 16-byte packs when every row is aligned; a view whose base
    is 2 or 4 bytes in goes element by element, with the same results as its aligned copy."""
    from tinymoe.kernels.dispatch import cupy_raw
    cp = tinymoe.backend.cupy()
    T, k, E, d = 37, 2, 4, 64
    rng = np.random.default_rng(0)
    ei = cp.asarray(rng.integers(0, E, (T, k)))
    w = cp.asarray(rng.random((T, k)), np.float32)
    flat = cp.asarray(rng.standard_normal(T * k * d + 1), dtype)
    x = flat[1:1 + T * d].reshape(T, d)                    # base one element in
    assert x.data.ptr % 16 and cupy_raw._pack_width(d, x) == 1
    plan = cupy_raw.make_dispatch_plan(ei, E)
    same = lambda a, b: np.testing.assert_array_equal(a.get(), b.get())  # noqa: E731
    same(cupy_raw.permute(x, plan), cupy_raw.permute(x.copy(), plan))
    ys = flat[1:1 + plan.num_rows * d].reshape(plan.num_rows, d)
    same(cupy_raw.combine(ys, w, plan), cupy_raw.combine(ys.copy(), w, plan))
    for got, want in zip(cupy_raw.combine_backward(x, ys, w, plan),
                         cupy_raw.combine_backward(x.copy(), ys.copy(), w, plan)):
        np.testing.assert_allclose(got.get(), want.get(), rtol=1e-5, atol=1e-4)
