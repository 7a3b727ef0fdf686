// Grouped matrix products whose groups are known only on the device (CUDA C, tensor cores).
// grouped_gemm.py launches; the spec is tinymoe/nn/moe/experts.py :: GroupedLinear's loop.
//
// After dropless dispatch, expert e owns the rows offsets[e] : offsets[e+1] of the permuted
// buffer, and the offsets are a device array. cuBLAS needs every group's size on the host
// (a device sync, then one launch per expert); these kernels read the offsets themselves, so
// the whole MoE layer keeps static shapes and can be captured in a CUDA graph.
//
//   rows:     C[rows of e] = A[rows of e] @ B[e]          A (R, K), B (E, K, N), C (R, N)
//   rows, TRANS_B:          A[rows of e] @ B[e]^T         B (E, N, K)   (dX = dY W^T)
//             rows after offsets[E] (slots no expert took) are written as zeros.
//   weights:  C[e] = A[rows of e]^T @ G[rows of e]        A (R, M), G (R, N), C (E, M, N)
//             (dW = X^T dY: the group is the sum's axis; an empty group gives C[e] = 0)
//
// One block computes a BM x BN tile of C with WMMA (16x16x16 tensor-core fragments), products
// summed in float32 and rounded once to data_t, as cuBLAS's CUBLAS_COMPUTE_32F does. The
// operands go through shared memory BK columns at a time, two stages: cp.async copies stage
// s+1 while the warps multiply stage s. Row tiles of the `rows` kernels are numbered across
// the groups (tile t of expert e covers BM of its rows), so the grid is sized by the bound
// ceil(R / BM) + E + 1 and a block finds its expert from the offsets; spare blocks return.
// Requirements (grouped_gemm.py checks): K and N multiples of 8 (16-byte rows), C-contiguous
// operands with 16-byte aligned bases.
//
// Compile-time constants (-D, grouped_gemm.py): data_t (__half or __nv_bfloat16).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

#ifndef data_t
#define data_t __nv_bfloat16
#endif

#define BM 128              // tile rows
#define BN 128              // tile columns
#define BK 32               // the sum's step per stage
#define WARPS_M 2           // 8 warps: 2 x 4, each a 64 x 32 piece of the tile
#define WARPS_N 4
#define THREADS (32 * WARPS_M * WARPS_N)
#define FRAG_M ((BM / WARPS_M) / 16)     // 4 fragments down
#define FRAG_N ((BN / WARPS_N) / 16)     // 2 fragments across
#define PAD 8               // shared rows padded by 16 bytes: fragment loads avoid bank conflicts
#define CHUNK 8             // elements per 16-byte copy
#define STAGE_ELEMS (BM * (BK + PAD) > BK * (BN + PAD) ? BM * (BK + PAD) : BK * (BN + PAD))

typedef long long i64;

template <bool COL> struct Layout { typedef wmma::row_major type; };
template <> struct Layout<true> { typedef wmma::col_major type; };

__device__ __forceinline__ __half to_data(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_data(float v, __nv_bfloat16) {
    return __float2bfloat16_rn(v);
}

// --- copies ---------------------------------------------------------------------------------

__device__ __forceinline__ void copy16(data_t* smem, const data_t* gmem, bool valid) {
    // 16 bytes global -> shared, asynchronously; an invalid source fills zeros (src-size 0).
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A tile of `rows` x BK from a row-major (., ld) matrix at (row0, k0), stored [BM][BK + PAD].
__device__ __forceinline__ void load_rows_by_k(data_t* s, const data_t* g, i64 ld, int rows,
                                               int k0, int K) {
    for (int c = threadIdx.x; c < BM * BK / CHUNK; c += THREADS) {
        int r = c / (BK / CHUNK), k = (c % (BK / CHUNK)) * CHUNK;
        bool ok = r < rows && k0 + k < K;
        copy16(s + r * (BK + PAD) + k, ok ? g + r * ld + k0 + k : g, ok);
    }
}

// A tile of BK x BN from a row-major (., ld) matrix at (k0, col0), stored [BK][BN + PAD].
__device__ __forceinline__ void load_k_by_cols(data_t* s, const data_t* g, i64 ld, int krows,
                                               int k0, int cols) {
    for (int c = threadIdx.x; c < BK * BN / CHUNK; c += THREADS) {
        int k = c / (BN / CHUNK), n = (c % (BN / CHUNK)) * CHUNK;
        bool ok = k0 + k < krows && n < cols;
        copy16(s + k * (BN + PAD) + n, ok ? g + (i64)(k0 + k) * ld + n : g, ok);
    }
}

// --- the tile's product -----------------------------------------------------------------------

// A fragment layout: row_major when the stage holds A as [BM][BK + PAD], col_major when it
// holds A^T's source rows as [BK][BM + PAD]. B likewise: row_major [BK][BN + PAD], col_major
// [BN][BK + PAD] (B^T's rows).
template <bool A_COL, bool B_COL>
struct Tile {
    typedef typename Layout<A_COL>::type LA;
    typedef typename Layout<B_COL>::type LB;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAG_M][FRAG_N];

    __device__ void zero() {
        for (int i = 0; i < FRAG_M; ++i)
            for (int j = 0; j < FRAG_N; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }

    // acc += As (BM x BK) @ Bs (BK x BN), this warp's 64 x 32 piece.
    __device__ void multiply(const data_t* As, const data_t* Bs, int wm, int wn) {
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, data_t, LA> a[FRAG_M];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, data_t, LB> b[FRAG_N];
            for (int i = 0; i < FRAG_M; ++i) {
                int m = wm * (BM / WARPS_M) + i * 16;
                if (A_COL) wmma::load_matrix_sync(a[i], As + kk * (BM + PAD) + m, BM + PAD);
                else wmma::load_matrix_sync(a[i], As + m * (BK + PAD) + kk, BK + PAD);
            }
            for (int j = 0; j < FRAG_N; ++j) {
                int n = wn * (BN / WARPS_N) + j * 16;
                if (B_COL) wmma::load_matrix_sync(b[j], Bs + n * (BK + PAD) + kk, BK + PAD);
                else wmma::load_matrix_sync(b[j], Bs + kk * (BN + PAD) + n, BN + PAD);
            }
            for (int i = 0; i < FRAG_M; ++i)
                for (int j = 0; j < FRAG_N; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }

    // C[r, c] = acc rounded to data_t for r < rows, c < cols of the tile; C row-major, ld.
    // Each fragment goes through a 16 x 16 float32 scratch of this warp's, then lane l
    // writes 8 consecutive elements of row l / 2 (one 16-byte store when all are inside).
    __device__ void store(data_t* C, i64 ld, int rows, int cols, float* scratch, int wm, int wn) {
        int lane = threadIdx.x % 32, r = lane / 2, c = (lane % 2) * 8;
        for (int i = 0; i < FRAG_M; ++i)
            for (int j = 0; j < FRAG_N; ++j) {
                wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
                __syncwarp();
                int row = wm * (BM / WARPS_M) + i * 16 + r, col = wn * (BN / WARPS_N) + j * 16 + c;
                if (row < rows) {
                    __align__(16) data_t v[8];
                    for (int q = 0; q < 8; ++q) v[q] = to_data(scratch[r * 16 + c + q], data_t());
                    data_t* dst = C + row * ld + col;
                    if (col + 8 <= cols) *(uint4*)dst = *(uint4*)v;
                    else for (int q = 0; col + q < cols; ++q) dst[q] = v[q];
                }
                __syncwarp();
            }
    }
};

__device__ void store_zeros(data_t* C, i64 ld, int rows, int cols) {
    for (int c = threadIdx.x; c < BM * BN / CHUNK; c += THREADS) {
        int r = c / (BN / CHUNK), n = (c % (BN / CHUNK)) * CHUNK;
        if (r < rows && n < cols) *(uint4*)(C + r * ld + n) = make_uint4(0, 0, 0, 0);
    }
}

// --- rows: C[rows of e] = A[rows of e] @ op(B[e]) --------------------------------------------

// Tile t -> (expert, first row, rows in tile); expert -1 for the tail after offsets[E].
__device__ void find_tile(const i64* offsets, int E, i64 R, i64 t, int* expert, i64* row0,
                          int* rows) {
    i64 tiles = 0;
    for (int e = 0; e < E; ++e) {
        i64 n = offsets[e + 1] - offsets[e], nt = (n + BM - 1) / BM;
        if (t < tiles + nt) {
            *expert = e;
            *row0 = offsets[e] + (t - tiles) * BM;
            *rows = (int)min((i64)BM, offsets[e + 1] - *row0);
            return;
        }
        tiles += nt;
    }
    *expert = -1;
    *row0 = offsets[E] + (t - tiles) * BM;
    *rows = (int)max((i64)0, min((i64)BM, R - *row0));
}

template <bool TRANS_B>
__device__ void grouped_rows(const data_t* A, const data_t* B, const i64* offsets, data_t* C,
                             int E, i64 R, int K, int N) {
    __shared__ __align__(128) data_t stage_a[2][STAGE_ELEMS];
    __shared__ __align__(128) data_t stage_b[2][STAGE_ELEMS];
    __shared__ int s_expert, s_rows;
    __shared__ i64 s_row0;
    if (threadIdx.x == 0) find_tile(offsets, E, R, blockIdx.x, &s_expert, &s_row0, &s_rows);
    __syncthreads();
    int e = s_expert, rows = s_rows, n0 = blockIdx.y * BN, cols = min(BN, N - n0);
    if (rows <= 0) return;                                         // a spare block
    if (e < 0) { store_zeros(C + s_row0 * N + n0, N, rows, cols); return; }
    const data_t* a = A + s_row0 * K;
    const data_t* b = B + (i64)e * K * N + (TRANS_B ? (i64)n0 * K : n0);
    Tile<false, TRANS_B> tile;
    tile.zero();
    int warp = threadIdx.x / 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    int steps = (K + BK - 1) / BK;
    auto load = [&](int s, int k0) {
        load_rows_by_k(stage_a[s], a, K, rows, k0, K);
        if (TRANS_B) load_rows_by_k(stage_b[s], b, K, cols, k0, K);   // B^T's rows: [BN][BK]
        else load_k_by_cols(stage_b[s], b, N, K, k0, cols);
        copies_commit();
    };
    load(0, 0);
    for (int s = 0; s < steps; ++s) {
        if (s + 1 < steps) { load((s + 1) % 2, (s + 1) * BK); copies_wait<1>(); }
        else copies_wait<0>();
        __syncthreads();
        tile.multiply(stage_a[s % 2], stage_b[s % 2], wm, wn);
        __syncthreads();
    }
    tile.store(C + s_row0 * N + n0, N, rows, cols, (float*)stage_a[0] + warp * 256, wm, wn);
}

extern "C" __global__ void __launch_bounds__(THREADS)
grouped_rows_nn(const data_t* A, const data_t* B, const i64* offsets, data_t* C, int E, i64 R,
                int K, int N) {
    grouped_rows<false>(A, B, offsets, C, E, R, K, N);
}

extern "C" __global__ void __launch_bounds__(THREADS)
grouped_rows_nt(const data_t* A, const data_t* B, const i64* offsets, data_t* C, int E, i64 R,
                int K, int N) {
    grouped_rows<true>(A, B, offsets, C, E, R, K, N);
}

// --- weights: C[e] = A[rows of e]^T @ G[rows of e] ---------------------------------------------

extern "C" __global__ void __launch_bounds__(THREADS)
grouped_weights(const data_t* A, const data_t* G, const i64* offsets, data_t* C, int M, int N) {
    __shared__ __align__(128) data_t stage_a[2][STAGE_ELEMS];
    __shared__ __align__(128) data_t stage_g[2][STAGE_ELEMS];
    int e = blockIdx.z, m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int rows = min(BM, M - m0), cols = min(BN, N - n0);
    i64 first = offsets[e], count = offsets[e + 1] - first;      // the sum runs over the group
    data_t* c = C + (i64)e * M * N + (i64)m0 * N + n0;
    if (count <= 0) { store_zeros(c, N, rows, cols); return; }
    const data_t* a = A + first * M + m0;                         // A^T's source: [BK][BM] tiles
    const data_t* g = G + first * N + n0;
    Tile<true, false> tile;
    tile.zero();
    int warp = threadIdx.x / 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    int K = (int)count, steps = (K + BK - 1) / BK;
    auto load = [&](int s, int k0) {
        // stage_a as [BK][BM + PAD]: the BM columns of A's rows k0 .. k0 + BK
        for (int q = threadIdx.x; q < BK * BM / CHUNK; q += THREADS) {
            int k = q / (BM / CHUNK), m = (q % (BM / CHUNK)) * CHUNK;
            bool ok = k0 + k < K && m < rows;
            copy16(stage_a[s] + k * (BM + PAD) + m, ok ? a + (i64)(k0 + k) * M + m : a, ok);
        }
        load_k_by_cols(stage_g[s], g, N, K, k0, cols);
        copies_commit();
    };
    load(0, 0);
    for (int s = 0; s < steps; ++s) {
        if (s + 1 < steps) { load((s + 1) % 2, (s + 1) * BK); copies_wait<1>(); }
        else copies_wait<0>();
        __syncthreads();
        tile.multiply(stage_a[s % 2], stage_g[s % 2], wm, wn);
        __syncthreads();
    }
    tile.store(c, N, rows, cols, (float*)stage_a[0] + warp * 256, wm, wn);
}
