// Fused LayerNorm and RMSNorm over the last axis, forward and backward, in CUDA C.
// The NumPy spec is tinymoe/autograd/ops/norm.py; norm.py (beside this file) launches.
//
//   LayerNorm: mean = sum_c x_c / d,  rstd = 1 / sqrt(sum_c (x_c - mean)^2 / d + eps)
//              xhat = (x - mean) rstd,  y = xhat w + b
//   RMSNorm:   rstd = 1 / sqrt(sum_c x_c^2 / d + eps),  xhat = x rstd,  y = xhat w
//   backward, with g = dy w:
//     LayerNorm dx = rstd (g - mean_c(g) - xhat mean_c(g xhat))
//     RMSNorm   dx = rstd (g - xhat mean_c(g xhat))
//     dw = sum over rows of dy xhat,   db = sum over rows of dy
//
// Arrays are (rows, d), C-contiguous. The row kernels give one warp one row: lane l walks
// columns l, l + 32, l + 64, ... (32 consecutive lanes read 32 consecutive words: each load
// is coalesced), sums in a register, and a butterfly of 5 xor-shuffles gives every lane the
// row's total (a + b == b + a in floating point, so all 32 lanes hold the same bits).
// The variance is two-pass (the mean first, then the squares of x - mean): no E[x^2] -
// E[x]^2 cancellation. Nothing of size (rows, d) is saved: the backward recomputes xhat
// from x and the per-row mean and rstd.
//
// dw and db are column sums over rows, with no atomics on floats: norm_bwd_dwdb's blocks
// tile (columns x row chunks); each block sums its chunk in a fixed order into a partial
// row, and the last block of a column tile to finish (an integer ticket) adds the chunks'
// partials in chunk order. The result does not depend on which block finishes last.
//
// Compile-time constants (given with -D by norm.py): data_t (the arrays' type: float, double,
// __half or __nv_bfloat16), scalar_t (the type sums are taken in and mean, rstd, dw, db are
// stored in: float for the three 32-bit-or-less types, double for double), WARPS (rows per block of the row kernels), COLS x ROWS_Y (the block of
// the dw/db kernel: COLS columns, ROWS_Y threads down the rows of each).

#ifndef scalar_t
#define scalar_t float
#endif
#ifndef data_t
#define data_t scalar_t
#endif
#ifdef HALF_TYPES
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef COLS
#define COLS 32
#endif
#ifndef ROWS_Y
#define ROWS_Y 8
#endif

#define WARP 32
#define FULL 0xffffffffu
typedef long long i64;

// One element of an array, widened to the type sums are taken in; and narrowed back.
__device__ __forceinline__ scalar_t load(data_t v) { return static_cast<scalar_t>(v); }
__device__ __forceinline__ data_t store(scalar_t v) { return data_t(v); }

// The sum of v over the 32 lanes, in every lane (butterfly: lane l adds lane l ^ k).
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
#pragma unroll
    for (int k = WARP / 2; k > 0; k /= 2) v += __shfl_xor_sync(FULL, v, k);
    return v;
}

// y = (x - mean) rstd w (+ b), one warp per row; mean[r], rstd[r] saved for the backward.
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
layer_norm_fwd(const data_t* __restrict__ x, const data_t* __restrict__ w,
               const data_t* __restrict__ b, bool has_bias, int rows, int d, scalar_t eps,
               data_t* __restrict__ y, scalar_t* __restrict__ mean_out,
               scalar_t* __restrict__ rstd_out) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;                      // the whole warp leaves together
    const data_t* xr = x + (i64)row * d;
    data_t* yr = y + (i64)row * d;

    scalar_t s = 0;                               // pass 1: mean = sum x / d
    for (int c = lane; c < d; c += WARP) s += load(xr[c]);
    const scalar_t mean = warp_sum(s) / scalar_t(d);

    scalar_t ss = 0;                              // pass 2: var = sum (x - mean)^2 / d
    for (int c = lane; c < d; c += WARP) {
        const scalar_t t = load(xr[c]) - mean;
        ss += t * t;
    }
    const scalar_t rstd = scalar_t(1) / sqrt(warp_sum(ss) / scalar_t(d) + eps);

    for (int c = lane; c < d; c += WARP) {        // pass 3: y = xhat w + b
        scalar_t v = (load(xr[c]) - mean) * rstd * load(w[c]);
        if (has_bias) v += load(b[c]);
        yr[c] = store(v);
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// y = x rstd w,  rstd = 1 / sqrt(mean(x^2) + eps); one warp per row; rstd[r] saved.
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
rms_norm_fwd(const data_t* __restrict__ x, const data_t* __restrict__ w, int rows, int d,
             scalar_t eps, data_t* __restrict__ y, scalar_t* __restrict__ rstd_out) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const data_t* xr = x + (i64)row * d;
    data_t* yr = y + (i64)row * d;

    scalar_t ss = 0;
    for (int c = lane; c < d; c += WARP) ss += load(xr[c]) * load(xr[c]);
    const scalar_t rstd = scalar_t(1) / sqrt(warp_sum(ss) / scalar_t(d) + eps);

    for (int c = lane; c < d; c += WARP) yr[c] = store(load(xr[c]) * rstd * load(w[c]));
    if (lane == 0) rstd_out[row] = rstd;
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)),  g = dy w,  xhat = (x - mean) rstd.
// Pass 1 sums g and g xhat over the row; pass 2 writes dx (x, dy re-read: L1/L2 hits).
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
layer_norm_bwd_dx(const data_t* __restrict__ dy, const data_t* __restrict__ x,
                  const data_t* __restrict__ w, const scalar_t* __restrict__ mean,
                  const scalar_t* __restrict__ rstd, int rows, int d,
                  data_t* __restrict__ dx) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const i64 base = (i64)row * d;
    const scalar_t mu = mean[row], r = rstd[row];

    scalar_t sg = 0, sgx = 0;
    for (int c = lane; c < d; c += WARP) {
        const scalar_t g = load(dy[base + c]) * load(w[c]);
        const scalar_t xhat = (load(x[base + c]) - mu) * r;
        sg += g;
        sgx += g * xhat;
    }
    const scalar_t mean_g = warp_sum(sg) / scalar_t(d);
    const scalar_t mean_gx = warp_sum(sgx) / scalar_t(d);

    for (int c = lane; c < d; c += WARP) {
        const scalar_t g = load(dy[base + c]) * load(w[c]);
        const scalar_t xhat = (load(x[base + c]) - mu) * r;
        dx[base + c] = store(r * (g - mean_g - xhat * mean_gx));
    }
}

// dx = rstd (g - xhat mean(g xhat)),  g = dy w,  xhat = x rstd.
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
rms_norm_bwd_dx(const data_t* __restrict__ dy, const data_t* __restrict__ x,
                const data_t* __restrict__ w, const scalar_t* __restrict__ rstd, int rows,
                int d, data_t* __restrict__ dx) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const i64 base = (i64)row * d;
    const scalar_t r = rstd[row];

    scalar_t sgx = 0;
    for (int c = lane; c < d; c += WARP)
        sgx += load(dy[base + c]) * load(w[c]) * (load(x[base + c]) * r);
    const scalar_t mean_gx = warp_sum(sgx) / scalar_t(d);

    for (int c = lane; c < d; c += WARP) {
        const scalar_t g = load(dy[base + c]) * load(w[c]);
        dx[base + c] = store(r * (g - (load(x[base + c]) * r) * mean_gx));
    }
}

// The ROWS_Y partial sums of column tx in smem[.][tx], added in the order ty = 0, 1, ...
__device__ __forceinline__ scalar_t column_total(const scalar_t (*smem)[COLS], int tx) {
    scalar_t t = 0;
#pragma unroll
    for (int k = 0; k < ROWS_Y; ++k) t += smem[k][tx];
    return t;
}

// dw[c] = sum_r dy[r, c] xhat[r, c],  db[c] = sum_r dy[r, c]  (db only when has_bias);
// xhat = (x - mean[r]) rstd[r] (LayerNorm, has_mean) or x rstd[r] (RMSNorm).
//
// grid (ceil(d / COLS), chunks), block (COLS, ROWS_Y). Block (i, k) owns columns
// i*COLS .. i*COLS + COLS-1 and rows k*rows_per_chunk .. (k+1)*rows_per_chunk - 1:
//   thread (tx, ty) sums rows ty, ty + ROWS_Y, ... of the chunk, in order, for one column
//   (a warp reads 32 consecutive columns of one row: coalesced);
//   the ROWS_Y sums are added in ty order (shared memory) -> the chunk's partial.
// One chunk: the partial is dw itself. Several: part[k, c] (dw) and part[chunks + k, c]
// (db) are written, and the block that takes the last ticket of counter[i] (zeroed by the
// caller) adds the partials of chunks 0, 1, ..., chunks-1 for its columns: thread ty sums
// chunks ty, ty + ROWS_Y, ... in order, then the ROWS_Y sums in ty order. Fixed order
// throughout: the same bits on every run.
extern "C" __global__ void __launch_bounds__(COLS * ROWS_Y)
norm_bwd_dwdb(const data_t* __restrict__ dy, const data_t* __restrict__ x,
              const scalar_t* __restrict__ mean, const scalar_t* __restrict__ rstd,
              bool has_mean, bool has_bias, int rows, int d, int rows_per_chunk,
              scalar_t* __restrict__ part, int* __restrict__ counter,
              scalar_t* __restrict__ dw, scalar_t* __restrict__ db) {
    __shared__ scalar_t s_dw[ROWS_Y][COLS], s_db[ROWS_Y][COLS];
    __shared__ bool last;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * COLS + tx;
    const int chunk = blockIdx.y, chunks = gridDim.y;
    const int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);

    scalar_t aw = 0, ab = 0;
    if (col < d) {
        for (int r = r0 + ty; r < r1; r += ROWS_Y) {
            const i64 i = (i64)r * d + col;
            const scalar_t xhat = (has_mean ? load(x[i]) - mean[r] : load(x[i])) * rstd[r];
            aw += load(dy[i]) * xhat;
            if (has_bias) ab += load(dy[i]);
        }
    }
    s_dw[ty][tx] = aw;
    s_db[ty][tx] = ab;
    __syncthreads();
    if (chunks == 1) {                            // the chunk's sum is the answer
        if (ty == 0 && col < d) {
            dw[col] = column_total(s_dw, tx);
            if (has_bias) db[col] = column_total(s_db, tx);
        }
        return;
    }
    if (ty == 0 && col < d) {
        part[(i64)chunk * d + col] = column_total(s_dw, tx);
        part[(i64)(chunks + chunk) * d + col] = column_total(s_db, tx);
    }
    __threadfence();                              // the partial is visible to every block
    __syncthreads();                              // ... before this block takes its ticket
    if (tx == 0 && ty == 0) last = atomicAdd(&counter[blockIdx.x], 1) == chunks - 1;
    __syncthreads();
    if (!last) return;

    aw = ab = 0;                                  // the last block: sum the chunks in order
    if (col < d) {
        for (int k = ty; k < chunks; k += ROWS_Y) {
            aw += __ldcg(part + (i64)k * d + col);  // __ldcg: from L2, not a stale L1 line
            if (has_bias) ab += __ldcg(part + (i64)(chunks + k) * d + col);
        }
    }
    s_dw[ty][tx] = aw;                            // every read of s_dw above was before
    s_db[ty][tx] = ab;                            // the two barriers
    __syncthreads();
    if (ty == 0 && col < d) {
        dw[col] = column_total(s_dw, tx);
        if (has_bias) db[col] = column_total(s_db, tx);
    }
}
