// Fused selective scan, forward and backward, in CUDA C (twin of numba_cuda.py: the same
// algorithm, see that file's docstring and docs/kernels.md; the backward here also copies
// the next B/C chunk with cp.async while it uses this one, keeps dA sums per lane and the
// tile's u and softplus' in shared memory: Numba has no cp.async and only 48 KB of it).
//
//   a_t = exp(delta_t A_n);  h_t = a_t h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t
//
// One warp owns one (b, d) row; a block holds WARPS rows of the same b, sharing the B, C
// tiles in shared memory. A tile is 32 * ITEMS steps; lane l holds ITEMS consecutive
// steps in registers, folds them into one affine map h -> P h + Q, and a warp scan of the
// maps gives each lane its incoming state. No float atomics: results are deterministic.
//
// 16-bit inputs (float16, bfloat16; mamba_ssm's recipe): u, delta, B, C, z, out and their
// gradients are stored as data_t and widened to scalar_t = float as they are read (tile_load,
// load_bc, prefetch_bc), so states, sums and every product are float32; outputs are rounded
// to data_t as they are written (stage_out). A, D, delta_bias, the tile states and the dA,
// dB, dC, dD partials are scalar_t. cp.async copies 4 bytes or more: with 16-bit B and C the
// backward's chunk prefetch becomes plain loads (HALF_STORAGE).
//
// Compile-time constants (given with -D by cupy_raw.py): scalar_t, data_t, ITEMS, WARPS, NCHUNK,
// MIN_BLOCKS (blocks per SM the register allocation must allow: caps registers per thread),
// DA_LANES (the backward's dA partial sums per state and warp: 32, or 1 for large N).

#ifndef scalar_t
#define scalar_t float
#endif
#ifndef data_t
#define data_t scalar_t
#endif
#ifdef HALF_STORAGE
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
#ifndef ITEMS
#define ITEMS 8
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef NCHUNK
#define NCHUNK 16
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
#ifndef DA_LANES
#define DA_LANES 32
#endif

#define WARP 32
#define TILE (WARP * ITEMS)          // steps per tile
// A tile staged in shared memory: step t at word t + t / 32 (one pad word per 32 steps).
// Then a warp reading 32 consecutive steps and a warp reading item i of every lane
// (lane l at l * ITEMS + l * ITEMS / 32 + i) both touch 32 different banks.
#define ROW (TILE + TILE / WARP)
#define PAD(t) ((t) + (t) / WARP)
static_assert(WARP % ITEMS == 0, "ITEMS must divide 32: a lane's steps never straddle a pad word");
#define FULL 0xffffffffu
#define BLOCK (WARPS * WARP)  // threads per block
#define SUM_ITERS ((2 * TILE + BLOCK - 1) / BLOCK)  // block-sum entries (dB or dC, step) per thread

#define LOG2E 1.4426950408889634

__device__ __forceinline__ float fexp(float x) { return __expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }
// 2^x as one MUFU.EX2, flushing results below 2^-126 to zero (exp2f adds a range fix-up
// of 3 instructions per call for those denormal results; Numba's fastmath does the same).
__device__ __forceinline__ float fexp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ double fexp2(double x) { return exp2(x); }
__device__ __forceinline__ float flog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double flog1p(double x) { return log1p(x); }
__device__ __forceinline__ float fast_div(float x, float y) { return __fdividef(x, y); }  // y in [1, 2^126]
__device__ __forceinline__ double fast_div(double x, double y) { return x / y; }

// One stored element widened to scalar_t; a scalar_t rounded to the stored format.
__device__ __forceinline__ scalar_t load(data_t v) { return static_cast<scalar_t>(v); }
__device__ __forceinline__ data_t store(scalar_t v) { return data_t(v); }

// Staging a tile row into registers, in two steps so that several rows' global loads can
// be in flight at once. tile_load: r[j] = src[t0 + j*32 + lane] (coalesced, zero past L).
__device__ __forceinline__ void tile_load(const data_t* __restrict__ src, bool valid, int t0,
                                          int L, int lane, scalar_t* r) {
    if (valid && t0 + TILE <= L) {  // a whole tile: no bounds tests
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) r[j] = load(src[t0 + j * WARP + lane]);
        return;
    }
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const int t = t0 + j * WARP + lane;
        r[j] = (valid && t < L) ? load(src[t]) : scalar_t(0);
    }
}

// tile_transpose: through the warp's row of shared memory, r[i] = step lane*ITEMS + i.
__device__ __forceinline__ void tile_transpose(scalar_t* r, scalar_t* sm, int lane) {
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) sm[PAD(j * WARP + lane)] = r[j];
    __syncwarp();
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) r[i] = sm[PAD(lane * ITEMS) + i];
    __syncwarp();
}

// dst[i] = src[row, t0 + lane*ITEMS + i]: coalesced global reads, then each lane takes its
// consecutive steps out of shared memory (zero past L).
__device__ __forceinline__ void stage_in(const data_t* __restrict__ src, bool valid, int t0,
                                         int L, scalar_t* sm, int lane, scalar_t* dst) {
    tile_load(src, valid, t0, L, lane, dst);
    tile_transpose(dst, sm, lane);
}

// cp.async: a copy of one element from global to shared memory that the thread does not
// wait for (zero-filled when !ok); cp_async_wait: until this thread's copies have landed.
__device__ __forceinline__ void cp_async(scalar_t* dst, const scalar_t* src, bool ok) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src),
                 "n"(sizeof(scalar_t)), "r"(ok ? int(sizeof(scalar_t)) : 0));
}
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// The block starts copying B[b, n0:n0+nc, tile] and C into a chunk buffer (2 * NCHUNK rows).
// (16-bit B, C: plain loads, widened, written before the barrier that publishes the chunk.)
__device__ __forceinline__ void prefetch_bc(const data_t* __restrict__ Bb,
                                            const data_t* __restrict__ Cb, int n0, int nc,
                                            int t0, int L, scalar_t* buf) {
    for (int p = threadIdx.x; p < nc * TILE; p += BLOCK) {
        const int k = p / TILE, tl = p % TILE, t = t0 + tl;
        const long off = (long)(n0 + k) * L + (t < L ? t : 0);
#ifdef HALF_STORAGE
        buf[k * ROW + PAD(tl)] = t < L ? load(Bb[off]) : scalar_t(0);
        buf[(NCHUNK + k) * ROW + PAD(tl)] = t < L ? load(Cb[off]) : scalar_t(0);
#else
        cp_async(buf + k * ROW + PAD(tl), Bb + off, t < L);
        cp_async(buf + (NCHUNK + k) * ROW + PAD(tl), Cb + off, t < L);
#endif
    }
}

// dst[row, t0 + lane*ITEMS + i] = src[i], written coalesced.
__device__ __forceinline__ void stage_out(data_t* __restrict__ dst, bool valid, int t0, int L,
                                          scalar_t* sm, int lane, const scalar_t* src) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) sm[PAD(lane * ITEMS) + i] = src[i];
    __syncwarp();
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        int p = j * WARP + lane, t = t0 + p;
        if (valid && t < L) dst[t] = store(sm[PAD(p)]);
    }
    __syncwarp();
}

// The block stages B[b, n0:n0+nc, tile] and C into shared memory (the forward's chunks).
__device__ __forceinline__ void load_bc(const data_t* __restrict__ Bb,
                                        const data_t* __restrict__ Cb, int n0, int nc, int t0,
                                        int L, scalar_t* sm) {
    __syncthreads();
#pragma unroll 4
    for (int p = threadIdx.x; p < nc * TILE; p += BLOCK) {
        int k = p / TILE, tl = p % TILE, t = t0 + tl, s = PAD(tl);
        long off = (long)(n0 + k) * L + t;
        sm[k * ROW + s] = t < L ? load(Bb[off]) : scalar_t(0);
        sm[(NCHUNK + k) * ROW + s] = t < L ? load(Cb[off]) : scalar_t(0);
    }
    __syncthreads();
}

// Inclusive warp scan of the maps h -> P h + Q, lane 0 first. Lane 0's map already holds
// the state carried in from the previous tile (Q_0 = P_0 h_carry + Q_0), so the scanned Q
// of lane l is the state at the end of lane l's steps. The last round needs no P.
__device__ __forceinline__ scalar_t scan_up(scalar_t P, scalar_t Q, int lane) {
#pragma unroll
    for (int k = 1; k < WARP; k *= 2) {
        const scalar_t Qp = __shfl_up_sync(FULL, Q, k);
        scalar_t Pp = 1;
        if (k < WARP / 2) Pp = __shfl_up_sync(FULL, P, k);
        if (lane >= k) { Q = P * Qp + Q; P = P * Pp; }  // (P, Q) after (Pp, Qp)
    }
    return Q;
}

// The same, lane 31 first (reverse time, for the backward): lane 31's map holds the
// carry from the tile to the right.
__device__ __forceinline__ scalar_t scan_down(scalar_t P, scalar_t Q, int lane) {
#pragma unroll
    for (int k = 1; k < WARP; k *= 2) {
        const scalar_t Qn = __shfl_down_sync(FULL, Q, k);
        scalar_t Pn = 1;
        if (k < WARP / 2) Pn = __shfl_down_sync(FULL, P, k);
        if (lane < WARP - k) { Q = P * Qn + Q; P = P * Pn; }
    }
    return Q;
}

// Fixed-order tree sum over the warp; the total lands in lane 0.
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
#pragma unroll
    for (int k = WARP / 2; k > 0; k /= 2) v += __shfl_down_sync(FULL, v, k);
    return v;
}

// delta' = softplus(delta + delta_bias) (or delta + delta_bias); zero past the end of L.
// With `sig` (the backward), also softplus'(x) = sigmoid(x) = e^x / (1 + e^x) per step
// (1 without softplus), stored to sig[i].
__device__ __forceinline__ void prepare_delta(scalar_t* dt, bool valid, int t0, int L, int lane,
                                              scalar_t bias, bool softplus,
                                              scalar_t* sig = nullptr) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        scalar_t x = dt[i] + bias, s = 1;
        if (softplus) {
            const scalar_t e = fexp(x);
            s = x > scalar_t(20) ? scalar_t(1) : fast_div(e, scalar_t(1) + e);
            x = x > scalar_t(20) ? x : flog1p(e);
        }
        if (!valid || t0 + lane * ITEMS + i >= L) x = 0;  // past the end: the identity step
        dt[i] = x;
        if (sig) sig[i] = s;
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS)
selective_scan_fwd(const data_t* __restrict__ u, const data_t* __restrict__ delta,
                   const scalar_t* __restrict__ A, const data_t* __restrict__ B,
                   const data_t* __restrict__ C, const scalar_t* __restrict__ D,
                   const data_t* __restrict__ z, const scalar_t* __restrict__ delta_bias,
                   data_t* __restrict__ out, scalar_t* __restrict__ hs, int d_inner, int L,
                   int N, bool has_D, bool has_z, bool has_bias, bool softplus, bool save_states) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);
    const int b = blockIdx.y, w = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int d = blockIdx.x * WARPS + w;
    const bool valid = d < d_inner;
    if (!valid) d = 0;  // an idle warp still joins every barrier, on zeros
    const long row = ((long)b * d_inner + d) * L;
    const data_t* Bb = B + (long)b * N * L;
    const data_t* Cb = C + (long)b * N * L;
    scalar_t* hs_row = hs + ((long)b * d_inner + d) * ((L + TILE - 1) / TILE) * N;
    scalar_t* stg = sm + 2 * NCHUNK * ROW + w * ROW;            // this warp's staging row
    scalar_t* car = sm + 2 * NCHUNK * ROW + WARPS * ROW + w * N;  // carried h[n]
    scalar_t* arow = car + WARPS * N;                             // this row's A[d, :] log2(e)
    scalar_t uu[ITEMS], dt[ITEMS], y[ITEMS], a[ITEMS], bu[ITEMS];
    for (int n = lane; n < N; n += WARP) { car[n] = 0; arow[n] = A[(long)d * N + n] * scalar_t(LOG2E); }
    const scalar_t Dd = has_D ? D[d] : scalar_t(0);
    const scalar_t bias = has_bias ? delta_bias[d] : scalar_t(0);
    for (int t0 = 0; t0 < L; t0 += TILE) {
        if (save_states) {  // the state entering this tile: the backward starts from it
            __syncwarp();
            for (int n = lane; n < N; n += WARP)
                if (valid) hs_row[(long)(t0 / TILE) * N + n] = car[n];
        }
        stage_in(u + row, valid, t0, L, stg, lane, uu);
        stage_in(delta + row, valid, t0, L, stg, lane, dt);
        prepare_delta(dt, valid, t0, L, lane, bias, softplus);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            y[i] = Dd * uu[i];   // the skip D u_t
            uu[i] *= dt[i];      // from here on uu holds delta_t u_t
        }
        for (int n0 = 0; n0 < N; n0 += NCHUNK) {
            const int nc = min(NCHUNK, N - n0);
            load_bc(Bb, Cb, n0, nc, t0, L, sm);
            for (int k = 0; k < nc; ++k) {
                const scalar_t An2 = arow[n0 + k];  // A_n log2(e): a_t = 2^(delta_t An2)
                const scalar_t* Bs = sm + k * ROW + PAD(lane * ITEMS);
                const scalar_t* Cs = sm + (NCHUNK + k) * ROW + PAD(lane * ITEMS);
                const scalar_t h_carry = car[n0 + k];
                scalar_t P = 1, Q = 0;  // this lane's steps folded: h_out = P h_in + Q
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    a[i] = fexp2(dt[i] * An2);          // a_t = exp(delta_t A_n)
                    bu[i] = uu[i] * Bs[i];              // delta_t B_t u_t
                    Q = a[i] * Q + bu[i];
                    P = P * a[i];
                }
                if (lane == 0) Q += P * h_carry;        // lane 0 starts from the carried state
                const scalar_t h_end = scan_up(P, Q, lane);
                scalar_t h = __shfl_up_sync(FULL, h_end, 1);  // state entering this lane's steps
                if (lane == 0) h = h_carry;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    h = a[i] * h + bu[i];               // h_t = a_t h_{t-1} + delta_t B_t u_t
                    y[i] += Cs[i] * h;                  // y_t += C_t[n] h_t[n]
                }
                if (lane == WARP - 1) car[n0 + k] = h;
            }
        }
        if (has_z) {
            stage_in(z + row, valid, t0, L, stg, lane, a);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) y[i] *= a[i] / (scalar_t(1) + fexp(-a[i]));  // silu
        }
        stage_out(out + row, valid, t0, L, stg, lane, y);
    }
}

// The backward, for one value of has_z (a compile-time constant: without z, y is never
// recomputed). hs holds the state entering every tile, written by the forward
// (save_states): tiles are walked last to first, each recomputing its states from hs.
// Per row, registers hold per step: delta_t, delta_t u_t, dy_t, the sums over
// states S_t = sum_n g_t[n] B_t[n] and E_t = sum_n g_t[n] h_{t-1}[n] A_n a_t[n] (then
// du_t = delta_t S_t + D dy_t, d delta_t = (u_t S_t + E_t) softplus'), and per state a_t, h_t.
template <bool HAS_Z>
__device__ __forceinline__ void scan_bwd(
    scalar_t* sm, const data_t* __restrict__ dout, const data_t* __restrict__ u,
    const data_t* __restrict__ delta, const scalar_t* __restrict__ A,
    const data_t* __restrict__ B, const data_t* __restrict__ C,
    const scalar_t* __restrict__ D, const data_t* __restrict__ z,
    const scalar_t* __restrict__ delta_bias, const scalar_t* __restrict__ hs,
    data_t* __restrict__ du, data_t* __restrict__ ddelta, data_t* __restrict__ dz,
    scalar_t* __restrict__ dB_part, scalar_t* __restrict__ dC_part,
    scalar_t* __restrict__ dA_part, scalar_t* __restrict__ dD_part,
    scalar_t* __restrict__ dbias_part, int d_inner, int L, int N, bool has_D, bool has_bias,
    bool softplus) {
    const int b = blockIdx.y, w = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int d = blockIdx.x * WARPS + w;
    const bool valid = d < d_inner;
    if (!valid) d = 0;
    const int ntiles = (L + TILE - 1) / TILE;
    const long row = ((long)b * d_inner + d) * L;
    const data_t* Bb = B + (long)b * N * L;
    const data_t* Cb = C + (long)b * N * L;
    // shared memory: two B/C chunk buffers (2 x 2 NCHUNK rows: one is read while the next
    // chunk is copied into the other); (2 buffers, 2, WARPS, ROW) dB, dC terms, also the
    // staging rows; a row of u per warp; per-warp carries, A and dA sums.
    scalar_t* red = sm + 4 * NCHUNK * ROW;
    scalar_t* stg = red + w * ROW;
    scalar_t* urow = red + 4 * WARPS * ROW + w * ROW;        // this tile's u, kept for the end
    scalar_t* sprow = red + 5 * WARPS * ROW + w * ROW;       // softplus' per step, for the end
    scalar_t* car = red + 6 * WARPS * ROW + w * N;  // the tile's starting h[n]
    scalar_t* gca = car + WARPS * N;                // carried a_{t+1} g_{t+1}[n]
    scalar_t* arow = gca + WARPS * N;               // this row's A[d, :] log2(e)
    // dA[n] of this row: DA_LANES = 32 running sums per state, one per lane (summed over the
    // warp once, at the end); DA_LANES = 1 where those do not fit (large N): the warp sums
    // its terms every state.
    scalar_t* dAl = red + 6 * WARPS * ROW + 3 * WARPS * N + w * N * DA_LANES;
    const scalar_t* hs_row = hs + ((long)b * d_inner + d) * ntiles * N;
    scalar_t dt[ITEMS], dtu[ITEMS], dy[ITEMS], S[ITEMS], E[ITEMS], a[ITEMS], h[ITEMS],
        y[HAS_Z ? ITEMS : 1];
    for (int n = lane; n < N; n += WARP) {
        gca[n] = 0; arow[n] = A[(long)d * N + n] * scalar_t(LOG2E);
    }
    for (int p = lane; p < N * DA_LANES; p += WARP) dAl[p] = 0;
    const scalar_t Dd = has_D ? D[d] : scalar_t(0);
    const scalar_t bias = has_bias ? delta_bias[d] : scalar_t(0);

    // This thread's share of the block sum: the same (dB or dC, step) entries every state.
    int sum_src[SUM_ITERS], sum_t[SUM_ITERS];
    bool sum_ok[SUM_ITERS];
    scalar_t* sum_dst[SUM_ITERS];
#pragma unroll
    for (int j = 0; j < SUM_ITERS; ++j) {
        const int p = threadIdx.x + j * BLOCK, which = p / TILE, tl = p % TILE;
        sum_ok[j] = p < 2 * TILE;
        sum_t[j] = tl;
        sum_src[j] = which * WARPS * ROW + PAD(tl);
        sum_dst[j] = (which == 0 ? dB_part : dC_part) +
                     ((long)b * gridDim.x + blockIdx.x) * N * L + tl;
    }
    scalar_t dD_acc = 0, dbias_acc = 0;
    int chunk = 0;  // chunks of B, C in processing order: tiles last to first, states in order
    prefetch_bc(Bb, Cb, 0, min(NCHUNK, N), (ntiles - 1) * TILE, L, sm);

    // Tiles last to first; per state, recompute h_t from the tile's starting state, then
    // reverse-scan g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}.
    for (int tile = ntiles - 1; tile >= 0; --tile) {
        const int t0 = tile * TILE;
        tile_load(u + row, valid, t0, L, lane, dtu);  // all of the tile's loads in flight at once
        tile_load(delta + row, valid, t0, L, lane, dt);
        tile_load(dout + row, valid, t0, L, lane, dy);
        if (HAS_Z) tile_load(z + row, valid, t0, L, lane, a);
        for (int n = lane; n < N; n += WARP)  // this tile's starting states, from the forward
            car[n] = valid ? hs_row[(long)tile * N + n] : scalar_t(0);
        tile_transpose(dtu, urow, lane);  // u stays in urow for the tile's end
        tile_transpose(dt, stg, lane);
        tile_transpose(dy, stg, lane);
        if (HAS_Z) tile_transpose(a, stg, lane);
        prepare_delta(dt, valid, t0, L, lane, bias, softplus, sprow + PAD(lane * ITEMS));
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            // out = y silu(z): dL/dy = dout silu(z)
            if (HAS_Z) dy[i] *= a[i] / (scalar_t(1) + fexp(-a[i]));
            if (HAS_Z) y[i] = Dd * dtu[i];
            dD_acc += dy[i] * dtu[i];  // dL/dD = sum_t dy_t u_t
            dtu[i] *= dt[i];           // delta_t u_t
            S[i] = 0;
            E[i] = 0;
        }
        for (int n0 = 0; n0 < N; n0 += NCHUNK, ++chunk) {
            const int nc = min(NCHUNK, N - n0);
            scalar_t* bc = sm + (chunk % 2) * 2 * NCHUNK * ROW;
            cp_async_wait();  // this chunk's B, C have landed (copied during the last chunk),
            __syncthreads();  // for every thread; and everyone is done with the other buffer
            if (n0 + NCHUNK < N)  // start copying the next chunk, in processing order
                prefetch_bc(Bb, Cb, n0 + NCHUNK, min(NCHUNK, N - n0 - NCHUNK), t0, L,
                            sm + ((chunk + 1) % 2) * 2 * NCHUNK * ROW);
            else if (tile > 0)
                prefetch_bc(Bb, Cb, 0, min(NCHUNK, N), t0 - TILE, L,
                            sm + ((chunk + 1) % 2) * 2 * NCHUNK * ROW);
            for (int k = 0; k < nc; ++k) {
                const int n = n0 + k;
                const scalar_t An2 = arow[n], An = An2 * scalar_t(1 / LOG2E);
                const scalar_t* Bs = bc + k * ROW + PAD(lane * ITEMS);
                const scalar_t* Cs = bc + (NCHUNK + k) * ROW + PAD(lane * ITEMS);
                const scalar_t h_carry = car[n], c_carry = gca[n];
                scalar_t P = 1, Q = 0;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    a[i] = fexp2(dt[i] * An2);
                    h[i] = dtu[i] * Bs[i];  // delta_t B_t u_t, then h_t
                    Q = a[i] * Q + h[i];
                    P = P * a[i];
                }
                if (lane == 0) Q += P * h_carry;
                const scalar_t h_end = scan_up(P, Q, lane);
                scalar_t h_in = __shfl_up_sync(FULL, h_end, 1);
                if (lane == 0) h_in = h_carry;
                scalar_t hc = h_in;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    hc = a[i] * hc + h[i];
                    h[i] = hc;
                    if (HAS_Z) y[i] += Cs[i] * hc;
                }
                // this lane's reverse map: c_out = a_first g_first = P c_in + Q
                Q = 0;
#pragma unroll
                for (int i = ITEMS - 1; i >= 0; --i) Q = a[i] * (Cs[i] * dy[i] + Q);
                if (lane == WARP - 1) Q += P * c_carry;  // lane 31 starts from the right's carry
                const scalar_t c_first = scan_down(P, Q, lane);
                scalar_t c = __shfl_down_sync(FULL, c_first, 1);  // a_{t+1} g_{t+1} from the right
                if (lane == WARP - 1) c = c_carry;
                scalar_t dA_acc = 0;
                scalar_t* rb = red + (n % 2) * 2 * WARPS * ROW;  // states alternate buffers
#pragma unroll
                for (int i = ITEMS - 1; i >= 0; --i) {
                    const int s = PAD(lane * ITEMS) + i;
                    const scalar_t g = Cs[i] * dy[i] + c;         // g_t
                    const scalar_t hp = i > 0 ? h[i > 0 ? i - 1 : 0] : h_in;  // h_{t-1}
                    S[i] += g * Bs[i];                            // dL/d(delta_t B_t u_t)
                    rb[w * ROW + s] = g * dtu[i];                 // dL/dB_t[n], this row
                    rb[(WARPS + w) * ROW + s] = dy[i] * h[i];     // dL/dC_t[n], this row
                    c = a[i] * g;
                    const scalar_t x = c * hp;                    // g_t a_t h_{t-1}
                    E[i] += x * An;                               // d h_t / d delta_t, via a_t
                    dA_acc += x * dt[i];                          // dL/dA_n
                }
                if (DA_LANES == 1) dA_acc = warp_sum(dA_acc);  // lane 0 holds the sum
                if (lane < DA_LANES) dAl[n * DA_LANES + lane] += dA_acc;
                if (lane == 0) gca[n] = c;
                // The block adds its rows' dB, dC terms in warp order: one partial per block.
                // One barrier per state: the next state writes the other buffer, and the
                // one after waits at the next barrier for this sum to finish.
                __syncthreads();
#pragma unroll
                for (int j = 0; j < SUM_ITERS; ++j) {
                    if (sum_ok[j]) {
                        scalar_t acc = 0;
#pragma unroll
                        for (int w2 = 0; w2 < WARPS; ++w2) acc += rb[sum_src[j] + w2 * ROW];
                        if (t0 + sum_t[j] < L) sum_dst[j][(long)n * L + t0] = acc;
                    }
                }
            }
        }
        __syncthreads();  // the sums are done before staging reuses the buffers
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) a[i] = urow[PAD(lane * ITEMS) + i];  // u again
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const bool past_end = t0 + lane * ITEMS + i >= L;
            const scalar_t sp = sprow[PAD(lane * ITEMS) + i];  // softplus'(delta + bias)
            E[i] = past_end ? scalar_t(0) : (a[i] * S[i] + E[i]) * sp;  // d delta_t
            S[i] = dt[i] * S[i] + Dd * dy[i];                             // du_t (+ skip D u)
            dbias_acc += E[i];
        }
        stage_out(du + row, valid, t0, L, stg, lane, S);
        stage_out(ddelta + row, valid, t0, L, stg, lane, E);
        if (HAS_Z) {  // dL/dz = dout y silu'(z), silu'(z) = s (1 + z (1 - s))
            tile_load(dout + row, valid, t0, L, lane, a);
            tile_load(z + row, valid, t0, L, lane, h);
            tile_transpose(a, stg, lane);
            tile_transpose(h, stg, lane);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                const scalar_t sg = scalar_t(1) / (scalar_t(1) + fexp(-h[i]));
                y[i] = a[i] * y[i] * sg * (scalar_t(1) + h[i] * (scalar_t(1) - sg));
            }
            stage_out(dz + row, valid, t0, L, stg, lane, y);
        }
    }
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    __syncwarp();
    if (valid) {
        if (lane == 0) {
            dD_part[(long)b * d_inner + d] = dD_acc;
            dbias_part[(long)b * d_inner + d] = dbias_acc;
        }
        for (int n = 0; n < N; ++n) {
            const scalar_t s = warp_sum(lane < DA_LANES ? dAl[n * DA_LANES + lane] : scalar_t(0));
            if (lane == 0) dA_part[((long)b * d_inner + d) * N + n] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS)
selective_scan_bwd(const data_t* __restrict__ dout, const data_t* __restrict__ u,
                   const data_t* __restrict__ delta, const scalar_t* __restrict__ A,
                   const data_t* __restrict__ B, const data_t* __restrict__ C,
                   const scalar_t* __restrict__ D, const data_t* __restrict__ z,
                   const scalar_t* __restrict__ delta_bias, const scalar_t* __restrict__ hs,
                   data_t* __restrict__ du, data_t* __restrict__ ddelta,
                   data_t* __restrict__ dz, scalar_t* __restrict__ dB_part,
                   scalar_t* __restrict__ dC_part, scalar_t* __restrict__ dA_part,
                   scalar_t* __restrict__ dD_part, scalar_t* __restrict__ dbias_part,
                   int d_inner, int L, int N, bool has_D, bool has_z, bool has_bias,
                   bool softplus) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);
    if (has_z)
        scan_bwd<true>(sm, dout, u, delta, A, B, C, D, z, delta_bias, hs, du, ddelta, dz, dB_part,
                       dC_part, dA_part, dD_part, dbias_part, d_inner, L, N, has_D, has_bias,
                       softplus);
    else
        scan_bwd<false>(sm, dout, u, delta, A, B, C, D, z, delta_bias, hs, du, ddelta, dz, dB_part,
                        dC_part, dA_part, dD_part, dbias_part, d_inner, L, N, has_D, has_bias,
                        softplus);
}
