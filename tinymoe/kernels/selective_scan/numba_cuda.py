"""Fused selective scan, forward and backward, in Numba CUDA (twin of cupy_raw.py).

Mamba's recurrence for one (batch b, channel d) row, per state n (Gu & Dao 2023, eq. 2a, 2b):
    a_t = exp(delta_t A_n)                      # discretized A (zero-order hold)
    h_t = a_t h_{t-1} + delta_t B_t u_t         # the scan
    y_t = sum_n C_t h_t + D u_t,   out_t = y_t * silu(z_t)

Work split (docs/kernels.md draws it):
- one warp owns one (b, d) row; a block holds `warps` rows of the same b, so they share
  the B and C tiles staged in shared memory;
- the row is cut into tiles of 32 * items steps; lane l holds steps l*items .. l*items +
  items - 1 of the tile in registers (loaded coalesced, then transposed through shared
  memory);
- each lane folds its steps into one affine map h -> P h + Q, a warp scan (5 shuffle
  rounds) composes the maps of the lanes before it, and a second pass over its items
  gives every h_t; the last lane's state carries into the next tile.
Nothing of size (batch, d_inner, L, N) is ever written. The backward recomputes the
states: the forward stores only each tile's starting state (when asked: TileStates in
common.py), then the backward walks the tiles last to first, recomputing each tile's
states from its start, with a reverse scan for dL/dh.

Shared memory: a tile row staged there holds step t at word t + t // 32 (pad: a pad word
per 32 steps), so that warps reading 32 consecutive steps (global <-> shared copies, the
block sum of dB/dC) and warps reading their lanes' items both meet no bank conflict.

Twin of selective_scan.cu (CUDA C): the same algorithm, names and shared-memory layout,
the same tile_load/tile_transpose staging (the backward issues all of a tile's global loads
before any goes through shared memory) and the same block sum of dB/dC (each thread's
entries fixed before the tile loop). The CUDA C backward opts in to more than 48 KB of
shared memory and uses cp.async; Numba can do neither, so here the backward
- loads each B/C chunk between two barriers (load_bc); the CUDA C copies the next chunk
  with cp.async into a second chunk buffer while it uses this one;
- sums dA over the warp every state (warp_sum, one sum per (warp, state) in shared
  memory); the CUDA C keeps 32 running sums per (warp, state), one per lane, and sums the
  warp once at the end (da_lanes; 1 per state where they do not fit, as here);
- stages u in again at the tile's end and recomputes softplus' = -expm1(-delta') per
  step; the CUDA C keeps rows of u and of softplus' in shared memory from the tile start;
- runs 8 warps with 4 states per chunk in under 48 KB (BWD_CONFIG; 2 blocks per SM), where
  the CUDA C runs 16 warps with 8 states per chunk (in two chunk buffers).
The forward is the same kernel in both; under 48 KB its chunk holds 8 states at N = 16 in
float32 (fit_config), the CUDA C's 16. Both kernels take a_t = exp(delta_t A_n) with
math.exp under fastmath, where the CUDA C takes 2^(delta_t A_n log2(e)) (ex2.approx.ftz in
float32).

Indices: hot array accesses read `a[at(i)]` (cuda_utils.at: the index as unsigned), which
spares Numba's test for Python's negative indices on every access (see at's docstring).

Determinism: dB and dC sum over d. Each block adds its warps in a fixed order in shared
memory and writes one partial per block; the wrapper sums the partials in block order.
dA, dD, d delta_bias are summed per row by a fixed shuffle tree, then over batch by xp.sum.
No float atomics anywhere, so results are identical run to run.
"""
from __future__ import annotations

import inspect
import math
from functools import lru_cache

import numpy as np
from numba import cuda, from_dtype, types

from ..cuda_half import codec, kernel_view
from ..cuda_utils import WARP, at, shfl_down, shfl_up, syncwarp
from ...backend import array_module
from ...dtypes import accumulation_dtype, as_dtype, is_half
from .common import TileStates, sum_partials, tile_count

# Launch shapes, chosen by benchmarks/bench_scan.py --sweep (see cupy_raw.py). Numba
# cannot opt in above 48 KB of shared memory: the backward runs 8 warps per block
# (2 blocks per SM, the same 16 warps per SM as the CUDA C twin) so that the double-
# buffered dB, dC rows and a chunk of 4 states fit.
FWD_CONFIG = dict(items=8, warps=16, nchunk=16, min_blocks=2)
BWD_CONFIG = dict(items=8, warps=8, nchunk=4, min_blocks=2)
# numba-cuda takes launch bounds (a register cap); Numba's simulator and old Numba do not.
_BOUNDS = "launch_bounds" in inspect.signature(cuda.jit).parameters


@lru_cache(maxsize=None)
def _kernels(storage, items, warps, nchunk, min_blocks=1, has_z=False):
    """Compile-time constants (the storage format of u, delta, B, C, z and the outputs,
    items per lane, warps per block, states per B/C chunk, whether z is given) make the
    per-lane arrays registers; one kernel pair each. Every global read of a stored array
    goes through `ld` and every write through `st` (cuda_half.codec): float32/64 as they
    are, a 16-bit format widened to float32, in which everything is computed."""
    if items < 1 or WARP % items:  # a lane's items must not straddle a pad word (see pad)
        raise ValueError(f"selective_scan (Numba CUDA): items={items} must divide {WARP}")
    ld, st, compute = codec(as_dtype(storage))
    T = from_dtype(compute)
    ZERO, ONE = compute.type(0), compute.type(1)
    TILE = WARP * items  # steps per tile
    ROW = TILE + TILE // WARP  # a staged tile: 32 * items steps and a pad word per 32 steps
    BLOCK = warps * WARP  # threads per block
    SUM_ITERS = (2 * TILE + BLOCK - 1) // BLOCK  # block-sum entries (dB or dC, step) per thread
    bounds = dict(launch_bounds=(BLOCK, min_blocks)) if _BOUNDS else {}

    @cuda.jit(device=True, inline=True)
    def pad(t):
        """The word of step t in a staged tile row: one pad word per 32 steps. Then a warp
        reading 32 consecutive steps and a warp reading item i of every lane (lane l at
        pad(l*items) + i) both touch 32 different banks. pad(l*items) + i = pad(l*items + i)
        because items divides 32: a lane's steps never straddle a pad word. (As `//`, not
        `>> 5`: Numba's shift on a signed int cost some 120 more SASS instructions per kernel.)"""
        return t + t // WARP

    @cuda.jit(device=True, inline=True)
    def tile_load(src, b, d, valid, t0, L, lane, r):
        """Staging a tile row into registers, in two steps so that several rows' global loads
        can be in flight at once. tile_load: r[j] = src[b, d, t0 + j*32 + lane] (coalesced,
        zero past L)."""
        if valid and t0 + TILE <= L:  # a whole tile: no bounds tests
            for j in range(items):
                r[j] = ld(src[at(b), at(d), at(t0 + j * WARP + lane)])
        else:
            for j in range(items):
                t = t0 + j * WARP + lane
                r[j] = ld(src[at(b), at(d), at(t)]) if (valid and t < L) else ZERO

    @cuda.jit(device=True, inline=True)
    def tile_transpose(r, sm, base, lane):
        """Through the warp's row sm[base:base+ROW]: r[i] = step lane*items + i."""
        for j in range(items):
            sm[at(base + pad(j * WARP + lane))] = r[j]
        syncwarp()
        for i in range(items):
            r[i] = sm[at(base + pad(lane * items) + i)]
        syncwarp()

    @cuda.jit(device=True, inline=True)
    def stage_in(src, b, d, valid, t0, L, sm, base, lane, dst):
        """dst[i] = src[b, d, t0 + lane*items + i]: coalesced global reads, then each
        lane takes its consecutive steps out of shared memory (zero past L)."""
        tile_load(src, b, d, valid, t0, L, lane, dst)
        tile_transpose(dst, sm, base, lane)

    @cuda.jit(device=True, inline=True)
    def stage_out(dst, b, d, valid, t0, L, sm, base, lane, src):
        """dst[b, d, t0 + lane*items + i] = src[i], written coalesced."""
        for i in range(items):
            sm[at(base + pad(lane * items) + i)] = src[i]
        syncwarp()
        for j in range(items):
            p = j * WARP + lane
            t = t0 + p
            if valid and t < L:
                dst[at(b), at(d), at(t)] = st(sm[at(base + pad(p))])
        syncwarp()

    @cuda.jit(device=True, inline=True)
    def load_bc(B, C, b, n0, nc, t0, L, sm):
        """The block stages B[b, n0:n0+nc, tile] and C into shared memory, coalesced:
        state k's row at k * ROW (C's at (nchunk + k) * ROW), step tl at pad(tl)."""
        cuda.syncthreads()
        for p in range(cuda.threadIdx.x, nc * TILE, BLOCK):
            k = p // TILE
            tl = p % TILE
            t = t0 + tl
            s = pad(tl)
            sm[at(k * ROW + s)] = ld(B[at(b), at(n0 + k), at(t)]) if t < L else ZERO
            sm[at((nchunk + k) * ROW + s)] = ld(C[at(b), at(n0 + k), at(t)]) if t < L else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def scan_up(P, Q, lane):
        """Inclusive warp scan of the maps h -> P h + Q, lane 0 first. Lane 0's map already
        holds the state carried in from the previous tile, so the scanned Q of lane l is
        the state at the end of lane l's steps. The last round needs no P."""
        k = 1
        while k < WARP:
            Qp = shfl_up(Q, k)
            Pp = shfl_up(P, k) if k < WARP // 2 else ONE
            if lane >= k:  # (P, Q) after (Pp, Qp): h -> P (Pp h + Qp) + Q
                Q = P * Qp + Q
                P = P * Pp
            k *= 2
        return Q

    @cuda.jit(device=True, inline=True)
    def scan_down(P, Q, lane):
        """The same, lane 31 first (reverse time, for the backward); lane 31's map holds
        the carry from the tile to the right."""
        k = 1
        while k < WARP:
            Qn = shfl_down(Q, k)
            Pn = shfl_down(P, k) if k < WARP // 2 else ONE
            if lane < WARP - k:  # lane + k < 32: one compare with an immediate
                Q = P * Qn + Q
                P = P * Pn
            k *= 2
        return Q

    @cuda.jit(device=True, inline=True)
    def warp_sum(v):
        """Fixed-order tree sum over the warp; the total lands in lane 0."""
        k = WARP // 2
        while k > 0:
            v += shfl_down(v, k)
            k //= 2
        return v

    @cuda.jit(device=True, inline=True)
    def prepare_delta(dt, d, valid, t0, L, lane, delta_bias, has_bias, use_softplus):
        """delta' = softplus(delta + delta_bias) (or delta + delta_bias); zero past L."""
        bias = delta_bias[d] if has_bias else ZERO
        for i in range(items):
            x = dt[i] + bias
            if use_softplus and x <= 20.0:
                x = math.log1p(math.exp(x))
            if not valid or t0 + lane * items + i >= L:
                x = ZERO  # past the end: a = 1, delta B u = 0, the identity step
            dt[i] = x

    @cuda.jit(fastmath=True, **bounds)
    def fwd(u, delta, A, B, C, D, z, delta_bias, out, hs, has_D, has_z, has_bias, use_softplus,
            save_states):
        b = cuda.blockIdx.y
        w = cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        d = cuda.blockIdx.x * warps + w
        valid = d < u.shape[1]
        if not valid:
            d = 0  # an idle warp still joins every barrier, on zeros
        L = u.shape[2]
        N = A.shape[1]
        sm = cuda.shared.array(0, T)
        stg = 2 * nchunk * ROW + w * ROW  # this warp's staging row
        car = 2 * nchunk * ROW + warps * ROW + w * N  # this warp's carried h[n]
        arow = car + warps * N  # this row's A[d, :], read once
        uu = cuda.local.array(items, T)
        dt = cuda.local.array(items, T)
        y = cuda.local.array(items, T)
        a = cuda.local.array(items, T)
        bu = cuda.local.array(items, T)
        for n in range(lane, N, WARP):
            sm[at(car + n)] = ZERO
            sm[at(arow + n)] = A[d, n]
        Dd = D[d] if has_D else ZERO
        for t0 in range(0, L, TILE):
            if save_states:  # the state entering this tile: the backward starts from it
                syncwarp()
                for n in range(lane, N, WARP):
                    if valid:
                        hs[at(b), at(d), at(t0 // TILE), at(n)] = sm[at(car + n)]
            stage_in(u, b, d, valid, t0, L, sm, stg, lane, uu)
            stage_in(delta, b, d, valid, t0, L, sm, stg, lane, dt)
            prepare_delta(dt, d, valid, t0, L, lane, delta_bias, has_bias, use_softplus)
            for i in range(items):
                y[i] = Dd * uu[i]  # the skip connection D u_t
                uu[i] *= dt[i]  # from here on uu holds delta_t u_t
            for n0 in range(0, N, nchunk):
                nc = min(nchunk, N - n0)
                load_bc(B, C, b, n0, nc, t0, L, sm)
                for k in range(nc):
                    An = sm[at(arow + n0 + k)]
                    bs = k * ROW + pad(lane * items)  # this lane's B_t[n], then C_t[n]
                    cs = bs + nchunk * ROW
                    h_carry = sm[at(car + n0 + k)]
                    P, Q = ONE, ZERO  # this lane's steps folded: h_out = P h_in + Q
                    for i in range(items):
                        a[i] = math.exp(dt[i] * An)  # a_t = exp(delta_t A_n)
                        bu[i] = uu[i] * sm[at(bs + i)]  # delta_t B_t u_t
                        Q = a[i] * Q + bu[i]
                        P = P * a[i]
                    if lane == 0:
                        Q += P * h_carry  # lane 0 starts from the carried state
                    h = shfl_up(scan_up(P, Q, lane), 1)  # state entering this lane's steps
                    if lane == 0:
                        h = h_carry
                    for i in range(items):
                        h = a[i] * h + bu[i]  # h_t = a_t h_{t-1} + delta_t B_t u_t
                        y[i] += sm[at(cs + i)] * h  # y_t += C_t[n] h_t[n]
                    if lane == WARP - 1:
                        sm[at(car + n0 + k)] = h
            if has_z:
                stage_in(z, b, d, valid, t0, L, sm, stg, lane, a)
                for i in range(items):
                    y[i] *= a[i] / (ONE + math.exp(-a[i]))  # y * silu(z)
            stage_out(out, b, d, valid, t0, L, sm, stg, lane, y)

    @cuda.jit(fastmath=True, **bounds)
    def bwd(dout, u, delta, A, B, C, D, z, delta_bias, hs, du, ddelta, dz,
            dB_part, dC_part, dA_part, dD_part, dbias_part, has_D, has_bias, use_softplus):
        """hs[b, d, tile, n]: the state entering each tile, from the forward. Per row,
        registers hold per step: delta_t, delta_t u_t, dy_t, the sums over states
        S_t = sum_n g_t[n] B_t[n] and E_t = sum_n g_t[n] h_{t-1}[n] A_n a_t[n] (then
        du_t = delta_t S_t + D dy_t, d delta_t = (u_t S_t + E_t) softplus'), and per
        state a_t, h_t. has_z is a compile-time constant: without z, y is not recomputed."""
        b = cuda.blockIdx.y
        w = cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        d = cuda.blockIdx.x * warps + w
        valid = d < u.shape[1]
        if not valid:
            d = 0
        L = u.shape[2]
        N = A.shape[1]
        ntiles = (L + TILE - 1) // TILE
        sm = cuda.shared.array(0, T)
        # shared memory: a B/C chunk (2 nchunk rows); (2 buffers, 2, warps, ROW) dB, dC
        # terms, whose 4 rows of this warp are also its staging rows; per-warp carries, A, dA.
        red = 2 * nchunk * ROW
        stg = red + w * ROW  # staging row 0 (u, then the tile's outputs); 1, 2, 3 below
        stg1 = red + (warps + w) * ROW  # delta, then z at the tile's end
        stg2 = red + (2 * warps + w) * ROW  # dout
        stg3 = red + (3 * warps + w) * ROW  # z
        car = red + 4 * warps * ROW + w * N  # the tile's starting h[n]
        gca = car + warps * N  # carried a_{t+1} g_{t+1}[n]
        dAs = gca + warps * N  # dA[n] of this row
        arow = dAs + warps * N  # this row's A[d, :], read once
        dt = cuda.local.array(items, T)
        dtu = cuda.local.array(items, T)
        dy = cuda.local.array(items, T)
        S = cuda.local.array(items, T)
        E = cuda.local.array(items, T)
        a = cuda.local.array(items, T)
        h = cuda.local.array(items, T)
        y = cuda.local.array(items if has_z else 1, T)
        for n in range(lane, N, WARP):
            sm[at(gca + n)] = ZERO
            sm[at(dAs + n)] = ZERO
            sm[at(arow + n)] = A[d, n]
        Dd = D[d] if has_D else ZERO

        # This thread's share of the block sum: the same (dB or dC, step) entries every
        # state. Entry p = threadIdx.x + j * BLOCK of the 2 * TILE: its word in a dB/dC
        # buffer, its step tl and its destination, row (b, block) of dB_part or dC_part.
        sum_ok = cuda.local.array(SUM_ITERS, types.boolean)  # p < 2 * TILE
        sum_c = cuda.local.array(SUM_ITERS, types.boolean)  # a dC entry (else dB)
        sum_src = cuda.local.array(SUM_ITERS, types.int32)
        sum_t = cuda.local.array(SUM_ITERS, types.int32)
        for j in range(SUM_ITERS):
            p = cuda.threadIdx.x + j * BLOCK
            which = p // TILE
            tl = p % TILE
            sum_ok[j] = p < 2 * TILE
            sum_c[j] = which != 0
            sum_t[j] = tl
            sum_src[j] = which * warps * ROW + pad(tl)
        dB_blk = dB_part[b, cuda.blockIdx.x]  # (N, L): this block's partial sums
        dC_blk = dC_part[b, cuda.blockIdx.x]

        # Tiles last to first; per state, recompute h_t from the tile's starting state, then
        # reverse-scan g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}.
        dD_acc = ZERO
        dbias_acc = ZERO
        for tile in range(ntiles - 1, -1, -1):
            t0 = tile * TILE
            tile_load(u, b, d, valid, t0, L, lane, dtu)  # every row's loads in flight at once
            tile_load(delta, b, d, valid, t0, L, lane, dt)
            tile_load(dout, b, d, valid, t0, L, lane, dy)
            if has_z:
                tile_load(z, b, d, valid, t0, L, lane, a)
            for n in range(lane, N, WARP):  # this tile's starting states, from the forward
                sm[at(car + n)] = hs[at(b), at(d), at(tile), at(n)] if valid else ZERO
            tile_transpose(dtu, sm, stg, lane)  # (its syncwarp also publishes car)
            tile_transpose(dt, sm, stg1, lane)
            tile_transpose(dy, sm, stg2, lane)
            if has_z:
                tile_transpose(a, sm, stg3, lane)
            prepare_delta(dt, d, valid, t0, L, lane, delta_bias, has_bias, use_softplus)
            for i in range(items):
                if has_z:  # out = y silu(z): dL/dy = dout silu(z)
                    dy[i] *= a[i] / (ONE + math.exp(-a[i]))
                    y[i] = Dd * dtu[i]
                dD_acc += dy[i] * dtu[i]  # dL/dD = sum_t dy_t u_t
                dtu[i] *= dt[i]  # delta_t u_t
                S[i] = ZERO
                E[i] = ZERO
            for n0 in range(0, N, nchunk):
                nc = min(nchunk, N - n0)
                load_bc(B, C, b, n0, nc, t0, L, sm)
                for k in range(nc):
                    n = n0 + k
                    An = sm[at(arow + n)]
                    bs = k * ROW + pad(lane * items)
                    cs = bs + nchunk * ROW
                    h_carry = sm[at(car + n)]
                    c_carry = sm[at(gca + n)]
                    P, Q = ONE, ZERO
                    for i in range(items):
                        a[i] = math.exp(dt[i] * An)
                        h[i] = dtu[i] * sm[at(bs + i)]  # delta_t B_t u_t, then h_t
                        Q = a[i] * Q + h[i]
                        P = P * a[i]
                    if lane == 0:
                        Q += P * h_carry
                    h_in = shfl_up(scan_up(P, Q, lane), 1)
                    if lane == 0:
                        h_in = h_carry
                    hc = h_in
                    for i in range(items):
                        hc = a[i] * hc + h[i]
                        h[i] = hc
                        if has_z:
                            y[i] += sm[at(cs + i)] * hc
                    # this lane's reverse map: c_out = a_first g_first = P c_in + Q
                    Q = ZERO
                    for i in range(items - 1, -1, -1):
                        Q = a[i] * (sm[at(cs + i)] * dy[i] + Q)
                    if lane == WARP - 1:
                        Q += P * c_carry  # lane 31 starts from the right tile's carry
                    c = shfl_down(scan_down(P, Q, lane), 1)  # a_{t+1} g_{t+1} from the right
                    if lane == WARP - 1:
                        c = c_carry
                    dA_acc = ZERO
                    rb = red + (n % 2) * 2 * warps * ROW  # states alternate buffers
                    for i in range(items - 1, -1, -1):
                        s = pad(lane * items) + i
                        g = sm[at(cs + i)] * dy[i] + c  # g_t
                        hp = h[i - 1] if i > 0 else h_in  # h_{t-1}
                        S[i] += g * sm[at(bs + i)]  # dL/d(delta_t B_t u_t)
                        sm[at(rb + w * ROW + s)] = g * dtu[i]  # dL/dB_t[n] (this row)
                        sm[at(rb + (warps + w) * ROW + s)] = dy[i] * h[i]  # dL/dC_t[n]
                        c = a[i] * g
                        x = c * hp  # g_t a_t h_{t-1}
                        E[i] += x * An  # d h_t / d delta_t, via a_t
                        dA_acc += x * dt[i]  # dL/dA_n
                    dA_acc = warp_sum(dA_acc)
                    if lane == 0:
                        sm[at(gca + n)] = c
                        sm[at(dAs + n)] += dA_acc
                    # The block adds its rows' dB, dC terms in warp order: one partial.
                    # One barrier per state: the next state writes the other buffer, and
                    # the one after waits at the next barrier for this sum to finish.
                    cuda.syncthreads()
                    for j in range(SUM_ITERS):
                        if sum_ok[j]:
                            acc = ZERO
                            for w2 in range(warps):
                                acc += sm[at(rb + sum_src[j] + w2 * ROW)]
                            t = t0 + sum_t[j]
                            if t < L:
                                if sum_c[j]:
                                    dC_blk[at(n), at(t)] = acc
                                else:
                                    dB_blk[at(n), at(t)] = acc
            cuda.syncthreads()  # the sums are done before staging reuses the buffers
            stage_in(u, b, d, valid, t0, L, sm, stg, lane, a)  # u again
            for i in range(items):
                past_end = t0 + lane * items + i >= L
                # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                sp = -math.expm1(-dt[i]) if use_softplus else ONE
                E[i] = ZERO if past_end else (a[i] * S[i] + E[i]) * sp  # d delta_t
                S[i] = dt[i] * S[i] + Dd * dy[i]  # du_t (+ the skip D u)
                dbias_acc += E[i]
            stage_out(du, b, d, valid, t0, L, sm, stg, lane, S)
            stage_out(ddelta, b, d, valid, t0, L, sm, stg, lane, E)
            if has_z:  # dL/dz = dout y silu'(z), silu'(z) = s (1 + z (1 - s))
                tile_load(dout, b, d, valid, t0, L, lane, a)
                tile_load(z, b, d, valid, t0, L, lane, h)
                tile_transpose(a, sm, stg, lane)
                tile_transpose(h, sm, stg1, lane)
                for i in range(items):
                    sg = ONE / (ONE + math.exp(-h[i]))
                    y[i] = a[i] * y[i] * sg * (ONE + h[i] * (ONE - sg))
                stage_out(dz, b, d, valid, t0, L, sm, stg, lane, y)
        dD_acc = warp_sum(dD_acc)
        dbias_acc = warp_sum(dbias_acc)
        syncwarp()
        if valid:
            if lane == 0:
                dD_part[b, d] = dD_acc
                dbias_part[b, d] = dbias_acc
            for n in range(lane, N, WARP):
                dA_part[b, d, n] = sm[at(dAs + n)]

    return fwd, bwd


# ---------------------------------------------------------------- array-level API
def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """(xp, storage, compute, arrays): u, delta, B, C, z contiguous in one storage format
    (float32, float64, float16 or bfloat16), A, D, delta_bias in the compute dtype (float32
    for the 16-bit formats); placeholders for absent inputs; bfloat16 as its uint16 bits."""
    xp = array_module(u)
    if u.ndim != 3 or delta.shape != u.shape or A.ndim != 2 or A.shape[0] != u.shape[1] \
            or B.shape != (u.shape[0], A.shape[1], u.shape[2]) or C.shape != B.shape:
        raise ValueError(
            f"selective_scan: expected u, delta (batch, d_inner, L), A (d_inner, N), B, C "
            f"(batch, N, L); got u {u.shape}, delta {delta.shape}, A {A.shape}, B {B.shape}, C {C.shape}")
    storage = u.dtype if is_half(u.dtype) else np.result_type(u.dtype, np.float32)
    if storage not in (np.float32, np.float64) and not is_half(storage):
        raise TypeError(f"selective_scan: float16, bfloat16, float32 or float64 inputs "
                        f"expected, got {u.dtype}")
    compute = accumulation_dtype(storage)
    # absent inputs become placeholders of the right rank (the kernel is typed for them)
    c = lambda x, ndim, dtype: kernel_view(xp.zeros((1,) * ndim, dtype) if x is None  # noqa: E731
                                           else xp.ascontiguousarray(x, dtype=dtype))
    return xp, storage, compute, [
        c(x, ndim, dtype) for x, ndim, dtype in
        ((u, 3, storage), (delta, 3, storage), (A, 2, compute), (B, 3, storage),
         (C, 3, storage), (D, 1, compute), (z, 3, storage), (delta_bias, 1, compute))]


SMEM_LIMIT = 48 * 1024  # dynamic shared memory a kernel gets without opting in


def fit_config(config, defaults, N, itemsize, bwd, limit=SMEM_LIMIT, smem=None):
    """The launch shape with nchunk (states per B/C chunk), then warps, halved until
    shared memory (`smem(cfg, N, itemsize, bwd)`, by default this twin's) fits `limit` bytes."""
    smem_bytes_of = smem or smem_bytes
    cfg = dict(defaults, **(config or {}))
    while cfg["nchunk"] > 1 and smem_bytes_of(cfg, N, itemsize, bwd) > limit:
        cfg["nchunk"] //= 2
    while cfg["warps"] > 1 and smem_bytes_of(cfg, N, itemsize, bwd) > limit:
        cfg["warps"] //= 2
    if smem_bytes_of(cfg, N, itemsize, bwd) > limit:
        raise ValueError(f"selective_scan (GPU kernels): d_state N={N} needs more than "
                         f"{limit} bytes of shared memory; use fewer states or impl='reference'")
    return cfg


def smem_bytes(cfg, N, itemsize, bwd):
    """Dynamic shared memory of one block of this twin's kernels (cupy_raw.py sizes its own):
    a B/C chunk (2 * nchunk rows), then a staging row per warp (the backward: its
    (2 buffers, 2, warps) dB/dC rows, also its staging rows), then per (warp, state) the
    carries and A (the backward: h and g carries, dA and A). A staged tile row is 32 * items
    steps plus a pad word per 32 steps."""
    row = (WARP + 1) * cfg["items"]
    if bwd:
        return (2 * cfg["nchunk"] * row + 4 * cfg["warps"] * row + 4 * cfg["warps"] * N) * itemsize
    return (2 * cfg["nchunk"] * row + cfg["warps"] * row + 2 * cfg["warps"] * N) * itemsize


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, config=None, return_states=False):
    """out (batch, d_inner, L), in u's format; with return_states, (out, TileStates) for
    the backward (the states in the compute dtype)."""
    xp, storage, dtype, arrs = _prepare(u, delta, A, B, C, D, z, delta_bias)
    cfg = fit_config(config, FWD_CONFIG, A.shape[1], np.dtype(dtype).itemsize, False)
    fwd, _ = _kernels(storage.name, cfg["items"], cfg["warps"], cfg["nchunk"],
                      cfg.get("min_blocks", 1))
    batch, d_inner, L = u.shape
    N = A.shape[1]
    out = xp.empty((batch, d_inner, L), storage)
    hs = xp.empty((batch, d_inner, tile_count(L, cfg["items"]), N), dtype) if return_states \
        else xp.empty((1, 1, 1, 1), dtype)  # a placeholder the kernel never writes
    if out.size:
        grid = ((d_inner + cfg["warps"] - 1) // cfg["warps"], batch)
        fwd[grid, cfg["warps"] * WARP, 0, smem_bytes(cfg, N, np.dtype(dtype).itemsize, False)](
            *arrs, kernel_view(out), hs, D is not None, z is not None, delta_bias is not None,
            bool(delta_softplus), bool(return_states))
    return (out, TileStates(cfg["items"], hs)) if return_states else out


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, config=None, states=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs. `states`:
    the forward's TileStates; without them (or for another tiling) a forward makes them."""
    xp, storage, dtype, arrs = _prepare(u, delta, A, B, C, D, z, delta_bias)
    if dout.shape != u.shape:
        raise ValueError(f"selective_scan_bwd: dout {dout.shape} must match u {u.shape}")
    cfg = fit_config(config, BWD_CONFIG, A.shape[1], np.dtype(dtype).itemsize, True)
    if states is None or states.items != cfg["items"]:
        _, states = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       dict(FWD_CONFIG, items=cfg["items"]), return_states=True)
    _, bwd = _kernels(storage.name, cfg["items"], cfg["warps"], cfg["nchunk"],
                      cfg.get("min_blocks", 1), z is not None)
    batch, d_inner, L = u.shape
    N = A.shape[1]
    blocks = (d_inner + cfg["warps"] - 1) // cfg["warps"]
    du, ddelta = xp.empty(u.shape, storage), xp.empty(u.shape, storage)
    dz = xp.empty(u.shape, storage) if z is not None else None
    dBC_part = xp.empty((2, batch, blocks, N, L), dtype)  # every entry written when L > 0
    dA_part = xp.zeros((batch, d_inner, N), dtype)
    dD_part = xp.zeros((batch, d_inner), dtype)
    dbias_part = xp.zeros((batch, d_inner), dtype)
    if u.size:
        bwd[(blocks, batch), cfg["warps"] * WARP, 0, smem_bytes(cfg, N, np.dtype(dtype).itemsize, True)](
            kernel_view(xp.ascontiguousarray(dout, dtype=storage)), *arrs, states.hs,
            kernel_view(du), kernel_view(ddelta), arrs[6] if dz is None else kernel_view(dz),
            dBC_part[0], dBC_part[1], dA_part, dD_part, dbias_part,
            D is not None, delta_bias is not None, bool(delta_softplus))
    return sum_partials(du, ddelta, dA_part, dBC_part, dD_part, dz, dbias_part, D, z, delta_bias)
