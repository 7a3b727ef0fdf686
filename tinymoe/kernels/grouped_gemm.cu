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
// One block computes a BM x BN tile of C on the tensor cores (PTX mma.sync m16n8k16, operands
// loaded from shared memory by ldmatrix), products summed in float32 and rounded once to
// data_t, as cuBLAS's CUBLAS_COMPUTE_32F does. (No <mma.h>: the CUDA headers that come with
// CuPy's wheels lack the crt/mma.h it includes, so NVRTC could not compile WMMA code.) The
// operands go through shared memory BK columns at a time in a ring of STAGES buffers: cp.async
// copies the slices s+1 .. s+STAGES-1 while the warps multiply slice s, so the copies' latency
// hides behind STAGES-1 slices of arithmetic. Row tiles of the `rows` kernels are numbered
// across the groups (tile t of expert e covers BM of its rows), so the grid's y is sized by the
// bound ceil(R / BM) + E + 1 and a block finds its expert from the offsets; spare blocks
// return. The grid's x runs over column tiles: the blocks resident at one time share a few
// row tiles of A (read from DRAM once, then from L2) instead of all of A sharing one column.
// Requirements (grouped_gemm.py checks): K and N multiples of 8 (16-byte rows), C-contiguous
// operands with 16-byte aligned bases.
//
// Compile-time constants (-D, grouped_gemm.py): data_t (__half or __nv_bfloat16), MMA_TYPE,
// its PTX name (f16 or bf16); BK, STAGES and WARPS (the defaults below; bench_grouped_gemm.py
// --configs compares others). The ring lives in dynamic shared memory: STAGES * 2 * STAGE_ELEMS * 2
// bytes (72 KiB for the default), more than the static 48 KiB, so the launcher raises the
// kernel's limit. (bench_grouped_gemm.py --configs, one H100 run: slices of 64 take 7% less
// time than slices of 32 in a ring of 4; deeper rings and 4 warps of 64 x 64 change it < 1%.)

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef data_t
#define data_t __nv_bfloat16
#endif
#ifndef MMA_TYPE
#define MMA_TYPE bf16       // the PTX name of data_t: bf16 or f16
#endif
#define STR_(x) #x
#define STR(x) STR_(x)

#define BM 128              // tile rows
#define BN 128              // tile columns
// BK, STAGES, WARPS: grouped_gemm.py's DEFAULT pipeline unless -D says otherwise
#ifndef BK
#define BK 64               // the sum's step per stage
#endif
#ifndef STAGES
#define STAGES 2            // shared buffers in the copy ring
#endif
#ifndef WARPS
#define WARPS 8             // 8 warps: 2 x 4, each a 64 x 32 piece of the tile (4: 2 x 2, 64 x 64)
#endif
#define WARPS_M 2
#define WARPS_N (WARPS / 2)
#define THREADS (32 * WARPS_M * WARPS_N)
#define FRAG_M ((BM / WARPS_M) / 16)     // 4 fragments of 16 rows down
#define FRAG_N ((BN / WARPS_N) / 8)      // 4 (8 with 4 warps) fragments of 8 columns across
#define BLOCKS_PER_SM 2     // __launch_bounds__: registers capped so that two blocks fit (128
                            // a thread with 8 warps), one computing while the other copies
#define PAD 8               // shared rows padded by 16 bytes: ldmatrix reads avoid bank conflicts
#define CHUNK 8             // elements per 16-byte copy
#define STAGE_ELEMS (BM * (BK + PAD) > BK * (BN + PAD) ? BM * (BK + PAD) : BK * (BN + PAD))

typedef long long i64;

// The loaders below serve either operand: a [BM][.] tile of A's rows or a [BN][.] one of B^T's,
// a [.][BN] tile of B or a [.][BM] one of A^T's source rows.
static_assert(BM == BN, "square tiles: one loader per layout");

__device__ __forceinline__ unsigned pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *(unsigned*)&v;
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(unsigned*)&v;
}

// --- copies ---------------------------------------------------------------------------------

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void copy16(data_t* smem, const data_t* gmem, bool valid) {
    // 16 bytes global -> shared, asynchronously; an invalid source fills zeros (src-size 0).
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
                 "l"(gmem), "r"(bytes));
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

// --- tensor-core fragments (PTX mma.sync m16n8k16, operands through ldmatrix) ----------------
//
// Lane l of a warp holds, of a 16x16 A fragment, A[l/4 (+8)][2(l%4) .. +1 (+8)] (4 registers of
// two 16-bit values); of a 16x8 B fragment, B[2(l%4) .. +1 (+8)][l/4] (2 registers); of the
// 16x8 float32 accumulator, C[l/4 (+8)][2(l%4) .. +1]. ldmatrix.x4 gives four 8x8 pieces,
// lanes 8i .. 8i+7 naming the 8 rows of piece i; .trans transposes each piece on the way,
// so an operand stored the other way round (k-major) loads as the same fragment.

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const data_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const data_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                            unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." STR(MMA_TYPE) "." STR(MMA_TYPE) ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// --- the tile's product -----------------------------------------------------------------------

// A_KMAJOR: the stage holds A^T's source rows, [BK][BM + PAD] (else A as [BM][BK + PAD]).
// B_NMAJOR: the stage holds B^T's rows, [BN][BK + PAD] (else B as [BK][BN + PAD]).
template <bool A_KMAJOR, bool B_NMAJOR>
struct Tile {
    float acc[FRAG_M][FRAG_N][4];      // this warp's 64 x 32 piece, float32

    __device__ void zero() {
        for (int i = 0; i < FRAG_M; ++i)
            for (int j = 0; j < FRAG_N; ++j)
                for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
    }

    // acc += As (BM x BK) @ Bs (BK x BN), this warp's piece.
    __device__ void multiply(const data_t* As, const data_t* Bs, int wm, int wn) {
        int lane = threadIdx.x % 32, piece = lane / 8, row = lane % 8;
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[FRAG_M][4], b[FRAG_N][2];
            for (int i = 0; i < FRAG_M; ++i) {
                int m = wm * (BM / WARPS_M) + i * 16;
                // pieces: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
                if (A_KMAJOR)
                    ldmatrix_x4_trans(a[i], As + (kk + (piece / 2) * 8 + row) * (BM + PAD) + m + (piece % 2) * 8);
                else
                    ldmatrix_x4(a[i], As + (m + lane % 16) * (BK + PAD) + kk + (lane / 16) * 8);
            }
            for (int jj = 0; jj < FRAG_N / 2; ++jj) {
                int n = wn * (BN / WARPS_N) + jj * 16;
                unsigned r[4];   // pieces: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                if (B_NMAJOR)
                    ldmatrix_x4(r, Bs + (n + (piece / 2) * 8 + row) * (BK + PAD) + kk + (piece % 2) * 8);
                else
                    ldmatrix_x4_trans(r, Bs + (kk + (piece % 2) * 8 + row) * (BN + PAD) + n + (piece / 2) * 8);
                b[2 * jj][0] = r[0];
                b[2 * jj][1] = r[1];
                b[2 * jj + 1][0] = r[2];
                b[2 * jj + 1][1] = r[3];
            }
            for (int i = 0; i < FRAG_M; ++i)
                for (int j = 0; j < FRAG_N; ++j) mma_16x8x16(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    }

    // acc = sum over the K / BK slices of As @ Bs. load(buffer, k0) issues the cp.async copies
    // of the slice at k0 into ring buffer `buffer`; every step commits one group of copies
    // (empty past the end), so "slice s has landed" is "at most STAGES-2 groups in flight".
    template <typename Load>
    __device__ void sum_over_k(int K, Load load, data_t (*As)[STAGE_ELEMS],
                               data_t (*Bs)[STAGE_ELEMS], int wm, int wn) {
        zero();
        int steps = (K + BK - 1) / BK;
        for (int s = 0; s < STAGES - 1; ++s) {          // fill the ring
            if (s < steps) load(s, s * BK);
            copies_commit();
        }
        for (int s = 0; s < steps; ++s) {
            copies_wait<STAGES - 2>();                    // slice s is in buffer s % STAGES
            __syncthreads();                              // ... for every thread, and all warps are
            int next = s + STAGES - 1;                    // done with slice s-1, whose buffer
            if (next < steps) load(next % STAGES, next * BK);   // the copies of `next` reuse
            copies_commit();
            multiply(As[s % STAGES], Bs[s % STAGES], wm, wn);
        }   // the groups still in flight are empty: the epilogue stores from registers
    }

    // C[r, c] = acc rounded to data_t for r < rows, c < cols of the tile; C row-major, ld.
    // Each lane writes its pairs of neighbours straight from registers (4-byte stores).
    __device__ void store(data_t* C, i64 ld, int rows, int cols, int wm, int wn) {
        int lane = threadIdx.x % 32;
        for (int i = 0; i < FRAG_M; ++i)
            for (int j = 0; j < FRAG_N; ++j) {
                int row = wm * (BM / WARPS_M) + i * 16 + lane / 4;
                int col = wn * (BN / WARPS_N) + j * 8 + (lane % 4) * 2;
                if (col >= cols) continue;        // cols is a multiple of 8: col + 1 < cols too
                if (row < rows)
                    *(unsigned*)(C + row * ld + col) = pack2(acc[i][j][0], acc[i][j][1], data_t());
                if (row + 8 < rows)
                    *(unsigned*)(C + (row + 8) * ld + col) = pack2(acc[i][j][2], acc[i][j][3], data_t());
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

// The ring: STAGES buffers for each operand, in dynamic shared memory (grouped_gemm.py sizes it).
extern __shared__ __align__(128) unsigned char ring[];
#define RING_A ((data_t(*)[STAGE_ELEMS])ring)
#define RING_B ((data_t(*)[STAGE_ELEMS])ring + STAGES)

template <bool TRANS_B>
__device__ void grouped_rows(const data_t* A, const data_t* B, const i64* offsets, data_t* C,
                             int E, i64 R, int K, int N) {
    __shared__ int s_expert, s_rows;
    __shared__ i64 s_row0;
    if (threadIdx.x == 0) find_tile(offsets, E, R, blockIdx.y, &s_expert, &s_row0, &s_rows);
    __syncthreads();
    int e = s_expert, rows = s_rows, n0 = blockIdx.x * BN, cols = min(BN, N - n0);
    if (rows <= 0) return;                                         // a spare block
    if (e < 0) { store_zeros(C + s_row0 * N + n0, N, rows, cols); return; }
    const data_t* a = A + s_row0 * K;
    const data_t* b = B + (i64)e * K * N + (TRANS_B ? (i64)n0 * K : n0);
    Tile<false, TRANS_B> tile;
    int warp = threadIdx.x / 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    tile.sum_over_k(K, [&](int s, int k0) {
        load_rows_by_k(RING_A[s], a, K, rows, k0, K);
        if (TRANS_B) load_rows_by_k(RING_B[s], b, K, cols, k0, K);   // B^T's rows: [BN][BK]
        else load_k_by_cols(RING_B[s], b, N, K, k0, cols);
    }, RING_A, RING_B, wm, wn);
    tile.store(C + s_row0 * N + n0, N, rows, cols, wm, wn);
}

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)
grouped_rows_nn(const data_t* A, const data_t* B, const i64* offsets, data_t* C, int E, i64 R,
                int K, int N) {
    grouped_rows<false>(A, B, offsets, C, E, R, K, N);
}

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)
grouped_rows_nt(const data_t* A, const data_t* B, const i64* offsets, data_t* C, int E, i64 R,
                int K, int N) {
    grouped_rows<true>(A, B, offsets, C, E, R, K, N);
}

// --- weights: C[e] = A[rows of e]^T @ G[rows of e] ---------------------------------------------

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)
grouped_weights(const data_t* A, const data_t* G, const i64* offsets, data_t* C, int M, int N) {
    int e = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    int rows = min(BM, M - m0), cols = min(BN, N - n0);
    i64 first = offsets[e], count = offsets[e + 1] - first;      // the sum runs over the group
    data_t* c = C + (i64)e * M * N + (i64)m0 * N + n0;
    if (count <= 0) { store_zeros(c, N, rows, cols); return; }
    const data_t* a = A + first * M + m0;                         // A^T's source: [BK][BM] tiles
    const data_t* g = G + first * N + n0;
    Tile<true, false> tile;   // A^T from A's rows (k-major), G as [BK][BN]
    int warp = threadIdx.x / 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    int K = (int)count;
    tile.sum_over_k(K, [&](int s, int k0) {
        load_k_by_cols(RING_A[s], a, M, K, k0, rows);   // [BK][BM + PAD]: A's rows k0 .. k0 + BK
        load_k_by_cols(RING_B[s], g, N, K, k0, cols);
    }, RING_A, RING_B, wm, wn);
    tile.store(c, N, rows, cols, wm, wn);
}
