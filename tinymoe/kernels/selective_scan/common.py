"""What the two GPU scan twins (numba_cuda.py, cupy_raw.py) share on the host side.

TileStates: the forward can write the state entering every tile of L (a (batch, d_inner,
ntiles, N) array, 1 / (32 items) the size of the (batch, d_inner, L, N) states): the
backward then starts each tile from it instead of running the recurrence forward again.

Partials: the backward writes per-block partials of dB and dC (each block sums its own rows) and
per-row partials of dA, dD and d delta_bias; no float atomics. Here they are summed over
blocks and over batch, always in the same order, so results are identical run to run.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ...backend import array_module, cupy, is_cupy_array


class TileStates(NamedTuple):
    """h entering each tile of 32 * items steps: hs[b, d, tile, n]. `items` says which
    tiling they belong to; a backward with another tiling recomputes its own."""
    items: int
    hs: object  # (batch, d_inner, ntiles, N) array


def tile_count(L, items):
    """Tiles of 32 * items steps covering L (at least one, so that arrays are never empty)."""
    return max(1, -(-L // (32 * items)))


@lru_cache(maxsize=None)
def _block_sum_kernel():
    # out[g, r] = sum_k part[g, k, r]: one thread per output, reads coalesced over r. Four
    # running sums (k mod 4) keep four loads in flight per thread; they are added in a fixed
    # order, so the result is the same on every run.
    return cupy().ElementwiseKernel(
        "raw T part, int64 blocks, int64 inner", "T out",
        """const long long g = i / inner, r = i % inner;
           const long long base = g * blocks * inner + r;
           T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
           long long k = 0;
           for (; k + 4 <= blocks; k += 4) {
               s0 += part[base + k * inner];
               s1 += part[base + (k + 1) * inner];
               s2 += part[base + (k + 2) * inner];
               s3 += part[base + (k + 3) * inner];
           }
           for (; k < blocks; ++k) s0 += part[base + k * inner];
           out = (s0 + s1) + (s2 + s3);""",
        "tinymoe_sum_block_partials")


def sum_over_blocks(part):
    """(G, blocks, *rest) -> (G, *rest): the partials summed over axis 1, in block order."""
    if not is_cupy_array(part):  # the CUDA simulator hands NumPy arrays around
        return part.sum(axis=1)
    xp = array_module(part)
    G, blocks, rest = part.shape[0], part.shape[1], part.shape[2:]
    out = xp.empty((G, *rest), part.dtype)
    inner = out.size // max(G, 1)
    _block_sum_kernel()(part, blocks, inner, out)
    return out


def sum_partials(du, ddelta, dA_part, dBC_part, dD_part, dz, dbias_part, D, z, delta_bias):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) from the backward's outputs.

    dBC_part (2, batch, blocks, N, L): dB's and dC's per-block partials, one buffer so that
    one launch sums both; dA_part (batch, d_inner, N), dD_part and dbias_part
    (batch, d_inner): per-row partials, summed over batch."""
    two, batch = dBC_part.shape[:2]
    dBC = sum_over_blocks(dBC_part.reshape(two * batch, *dBC_part.shape[2:]))
    dBC = dBC.reshape(two, batch, *dBC.shape[1:])                     # (2, batch, N, L)
    return (du, ddelta, dA_part.sum(axis=0), dBC[0], dBC[1],
            dD_part.sum(axis=0) if D is not None else None,
            dz if z is not None else None,
            dbias_part.sum(axis=0) if delta_bias is not None else None)
