"""Fused selective scan, forward and backward, as CuPy RawKernels (CUDA C in selective_scan.cu).

The algorithm is numba_cuda.py's; the backward adds what Numba cannot express or fit in
its 48 KB of shared memory (cp.async copies of the next B/C chunk, per-lane dA sums, rows
of u and softplus' kept for the tile's end: docs/kernels.md, "Numba and CUDA C side by
side"). This file only compiles the source for one configuration (dtype, items per lane,
warps per block, states per B/C chunk, dA sums per warp), sizes the shared memory and
launches. Inputs and outputs are CuPy arrays.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ...backend import cupy
from ...dtypes import accumulation_dtype, as_dtype, is_half
from ..cuda_half import kernel_view
from .common import TileStates, sum_partials, tile_count
from .numba_cuda import SMEM_LIMIT, _prepare, fit_config

SOURCE = Path(__file__).with_name("selective_scan.cu")
WARP = 32
# Launch shapes, chosen by benchmarks/bench_scan.py --sweep. min_blocks caps the registers
# per thread (65536 / (min_blocks * threads)): the forward takes 64 so that 32 warps fit an
# SM; the backward's per-step arrays (7 x 8 items) need 128, 16 warps per SM. Its chunk of
# 8 states (not 16) copies the next chunk in twice per tile: 2 % faster in the sweep.
FWD_CONFIG = dict(items=8, warps=16, nchunk=16, min_blocks=2)
BWD_CONFIG = dict(items=8, warps=16, nchunk=8, min_blocks=1)
SMEM_OPT_IN = 227 * 1024  # a Hopper block may use this much shared memory, after opting in


def smem_bytes(cfg, N, itemsize, bwd):
    """Dynamic shared memory of one block, as selective_scan.cu lays it out. A staged tile
    row is 32 * items steps plus a pad word per 32 steps.
    Forward: a B/C chunk (2 * nchunk rows), a staging row per warp, carries and A per (warp, n).
    Backward: two B/C chunks (the next one is copied in while this one is used), dB/dC rows
    (2 buffers x 2 x warps, also the staging rows), rows of u and of softplus' per warp,
    carries, A per (warp, n) and dA per (warp, n, da_lanes)."""
    row = (WARP + 1) * cfg["items"]
    if bwd:
        return (4 * cfg["nchunk"] * row + 6 * cfg["warps"] * row +
                3 * cfg["warps"] * N + cfg.get("da_lanes", WARP) * cfg["warps"] * N) * itemsize
    return (2 * cfg["nchunk"] * row + cfg["warps"] * row + 2 * cfg["warps"] * N) * itemsize


CTYPES = {"float32": "float", "float64": "double", "float16": "__half",
          "bfloat16": "__nv_bfloat16"}


def nvcc_options(dtype, items, warps, nchunk, min_blocks=1, da_lanes=WARP):
    """The -D defines that specialise selective_scan.cu (also used by the compile test):
    `dtype` is the storage format of u, delta, B, C, z; the compute type scalar_t is float32
    for the 16-bit formats."""
    if items < 1 or WARP % items:  # a lane's items must not straddle a pad word (PAD in the .cu)
        raise ValueError(f"selective_scan (CUDA C): items={items} must divide {WARP}")
    storage = as_dtype(dtype)
    half = ("-DHALF_STORAGE",) if is_half(storage) else ()
    return (f"-Ddata_t={CTYPES[storage.name]}",
            f"-Dscalar_t={CTYPES[accumulation_dtype(storage).name]}", *half, f"-DITEMS={items}", f"-DWARPS={warps}", f"-DNCHUNK={nchunk}",
            f"-DMIN_BLOCKS={min_blocks}", f"-DDA_LANES={da_lanes}")


@lru_cache(maxsize=None)
def _module(dtype, items, warps, nchunk, min_blocks, da_lanes):
    cp = cupy()
    return cp.RawModule(code=SOURCE.read_text(), options=("--std=c++17", "-lineinfo") +
                        nvcc_options(dtype, items, warps, nchunk, min_blocks, da_lanes))


@lru_cache(maxsize=None)
def _function(name, dtype, items, warps, nchunk, min_blocks, da_lanes):
    """The kernel, looked up once (get_function asks the driver on every call)."""
    return _module(dtype, items, warps, nchunk, min_blocks, da_lanes).get_function(name)


_OPTED_IN = {}  # kernel key -> the most dynamic shared memory it has been allowed so far


def _launch(name, cfg, dtype, grid, smem, args):
    key = (name, as_dtype(dtype).name, cfg["items"], cfg["warps"], cfg["nchunk"],
           cfg.get("min_blocks", 1), cfg.get("da_lanes", WARP))
    kernel = _function(*key)
    if smem > _OPTED_IN.get(key, SMEM_LIMIT):  # opt in above 48 KB once per size, not per launch
        kernel.max_dynamic_shared_size_bytes = smem
        _OPTED_IN[key] = smem
    kernel(grid, (cfg["warps"] * WARP,), args, shared_mem=smem)


def _flags(D, z, delta_bias, delta_softplus):
    return tuple(np.bool_(x) for x in (D is not None, z is not None, delta_bias is not None,
                                       bool(delta_softplus)))


def bwd_config(config, N, itemsize):
    """The backward's launch shape: per-lane dA sums (da_lanes 32) where the block fits with
    them at its chosen shape, else one sum per warp and state (da_lanes 1) before shrinking
    the shape (fit_config)."""
    cfg = dict(BWD_CONFIG, **(config or {}))
    if "da_lanes" not in (config or {}) and smem_bytes(cfg, N, itemsize, True) > SMEM_OPT_IN:
        cfg["da_lanes"] = 1
    return fit_config(cfg, {}, N, itemsize, True, SMEM_OPT_IN, smem_bytes)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, config=None, return_states=False):
    """out (batch, d_inner, L); with return_states, (out, TileStates) for the backward.
    CuPy arrays in and out."""
    xp, storage, dtype, arrs = _prepare(u, delta, A, B, C, D, z, delta_bias)
    cfg = fit_config(config, FWD_CONFIG, A.shape[1], np.dtype(dtype).itemsize, False, SMEM_OPT_IN,
                     smem_bytes)
    batch, d_inner, L = u.shape
    N = A.shape[1]
    out = xp.empty((batch, d_inner, L), storage)
    hs = xp.empty((batch, d_inner, tile_count(L, cfg["items"]), N), dtype) if return_states \
        else xp.empty((1, 1, 1, 1), dtype)                # a placeholder the kernel never writes
    if out.size:
        grid = ((d_inner + cfg["warps"] - 1) // cfg["warps"], batch)
        smem = smem_bytes(cfg, N, np.dtype(dtype).itemsize, False)
        _launch("selective_scan_fwd", cfg, storage, grid, smem,
                (*arrs, kernel_view(out), hs, np.int32(d_inner), np.int32(L), np.int32(N),
                 *_flags(D, z, delta_bias, delta_softplus), np.bool_(return_states)))
    return (out, TileStates(cfg["items"], hs)) if return_states else out


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, config=None, states=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs. `states`:
    the forward's TileStates; without them (or for another tiling) a forward makes them."""
    xp, storage, dtype, arrs = _prepare(u, delta, A, B, C, D, z, delta_bias)
    if dout.shape != u.shape:
        raise ValueError(f"selective_scan_bwd: dout {dout.shape} must match u {u.shape}")
    cfg = bwd_config(config, A.shape[1], np.dtype(dtype).itemsize)
    if states is None or states.items != cfg["items"]:
        _, states = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       dict(FWD_CONFIG, items=cfg["items"]), return_states=True)
    batch, d_inner, L = u.shape
    N = A.shape[1]
    blocks = (d_inner + cfg["warps"] - 1) // cfg["warps"]
    du, ddelta = xp.empty(u.shape, storage), xp.empty(u.shape, storage)
    dz = xp.empty(u.shape, storage) if z is not None else None
    dBC_part = xp.empty((2, batch, blocks, N, L), dtype)  # every entry written when L > 0
    per_row = xp.empty if u.size else xp.zeros  # the kernel writes every row's partials
    dA_part = per_row((batch, d_inner, N), dtype)
    dD_part = per_row((batch, d_inner), dtype)
    dbias_part = per_row((batch, d_inner), dtype)
    if u.size:
        smem = smem_bytes(cfg, N, np.dtype(dtype).itemsize, True)
        _launch("selective_scan_bwd", cfg, storage, (blocks, batch), smem,
                (kernel_view(xp.ascontiguousarray(dout, dtype=storage)), *arrs, states.hs,
                 kernel_view(du), kernel_view(ddelta), arrs[6] if dz is None else kernel_view(dz),
                 dBC_part[0], dBC_part[1], dA_part, dD_part, dbias_part,
                 np.int32(d_inner), np.int32(L), np.int32(N),
                 *_flags(D, z, delta_bias, delta_softplus)))
    return sum_partials(du, ddelta, dA_part, dBC_part, dD_part, dz, dbias_part, D, z, delta_bias)
