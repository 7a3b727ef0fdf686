"""Warp primitives for Numba CUDA kernels that also run under NUMBA_ENABLE_CUDASIM=1.

On a GPU `shfl_up(v, k)` is one `shfl.sync.up` instruction. Numba's simulator has no
warp shuffles, so there the same functions trade values through shared memory between
two block barriers; every thread of the block must then call them together, which our
kernels do (all threads run every scan, idle rows on zeros).
"""
import threading

import numpy as np
from numba import config, cuda

FULL_MASK = 0xFFFFFFFF
WARP = 32


@cuda.jit(device=True, inline=True)
def at(i):
    """i as an unsigned index: `a[at(i)]` instead of `a[i]` in hot loops.

    Numba gives a signed index Python's meaning (a[-1] is the last element), so every
    access with one tests its sign and adds the length: 4-5 instructions, and the 64-bit
    arithmetic costs registers. An unsigned index skips that (our indices are never
    negative). In the scan kernels this took the forward from 3616 to 2144 instructions
    (nvcc's CUDA C: 1792) and the backward's spills to none."""
    return np.uint64(i)

if not config.ENABLE_CUDASIM:

    @cuda.jit(device=True, inline=True)
    def shfl_up(v, k):
        """Value of lane (lane - k); lanes below k keep their own."""
        return cuda.shfl_up_sync(FULL_MASK, v, k)

    @cuda.jit(device=True, inline=True)
    def shfl_down(v, k):
        """Value of lane (lane + k); lanes above 31 - k keep their own."""
        return cuda.shfl_down_sync(FULL_MASK, v, k)

    @cuda.jit(device=True, inline=True)
    def shfl_idx(v, src):
        """Value of lane `src` (a broadcast)."""
        return cuda.shfl_sync(FULL_MASK, v, src)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        cuda.syncwarp(FULL_MASK)

else:  # the simulator: Python run by one thread per CUDA thread

    @cuda.jit(device=True)
    def _trade(v, src_lane):
        # Two buffers used in turn: one barrier per trade suffices, because a thread
        # reaching trade k+2 (same buffer as k) has passed trade k+1's barrier, which
        # every thread reaches only after its reads of trade k.
        buf = cuda.shared.array((2, 1024), np.float64)  # one slot per thread of the block
        me = threading.current_thread()
        k = me.__dict__.get("tinymoe_trades", 0)
        me.tinymoe_trades = k + 1
        tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        buf[k % 2, tid] = v
        cuda.syncthreads()
        return type(v)(buf[k % 2, tid - tid % WARP + src_lane])

    @cuda.jit(device=True)
    def shfl_up(v, k):
        lane = cuda.threadIdx.x % WARP
        return _trade(v, lane - k if lane >= k else lane)

    @cuda.jit(device=True)
    def shfl_down(v, k):
        lane = cuda.threadIdx.x % WARP
        return _trade(v, lane + k if lane + k < WARP else lane)

    @cuda.jit(device=True)
    def shfl_idx(v, src):
        return _trade(v, src)

    @cuda.jit(device=True)
    def syncwarp():
        cuda.syncthreads()
