// The causal softmax of attention, forward and backward, one kernel each (CUDA C).
// The spec is tinymoe/nn/attention.py :: CausalAttention in array code; softmax.py launches.
//
//   forward   S = Q K^T (the GEMM's output, unscaled), query i of Lq sees keys j <= i + (Lk - Lq)
//             m = max_j (S_j scale),  l = sum_j exp(S_j scale - m),  P_j = exp(S_j scale - m) / l
//             lse = m + log l                      (kept instead of P by selective recomputation)
//   recompute P_j = exp(S_j scale - lse)           (the backward's P from S and the saved lse)
//   backward  D = sum_c dO_c O_c                   (FlashAttention-2's D = rowsum(dP * P))
//             dS_j = P_j (dP_j - D) scale          (dP = dO V^T, another GEMM's output)
//
// In array code the forward is ~8 passes over the (B, H, Lq, Lk) scores (scale, mask, max,
// subtract, exp, sum, divide, cast) and the backward ~6: on a training step of a transformer
// with L = 512 they were a third of the GPU's time. Here each is one pass: one warp per row;
// lane l walks keys l, l + 32, ... (coalesced), and the row's max and sum come from a
// butterfly of xor-shuffles (every lane holds the same bits). A row is read three times
// (max, sum, write) from L1/L2, written once; masked keys are never read and get P = 0.
//
// Compile-time constants (-D, softmax.py): data_t (S, P, dP, dS, O, dO: float, double, __half
// or __nv_bfloat16), scalar_t (sums, lse: float, or double for double), WARPS (rows per block).

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

#define WARP 32
#define FULL 0xffffffffu
typedef long long i64;

__device__ __forceinline__ scalar_t load(data_t v) { return static_cast<scalar_t>(v); }
__device__ __forceinline__ data_t store(scalar_t v) { return data_t(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

// -inf without <math.h>'s INFINITY (NVRTC, which compiles this at run time, has no such header)
__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) { return __longlong_as_double(0xfff0000000000000ULL); }

__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
#pragma unroll
    for (int k = WARP / 2; k > 0; k /= 2) v += __shfl_xor_sync(FULL, v, k);
    return v;
}

__device__ __forceinline__ scalar_t warp_max(scalar_t v) {
#pragma unroll
    for (int k = WARP / 2; k > 0; k /= 2) v = max(v, __shfl_xor_sync(FULL, v, k));
    return v;
}

// P (rows, Lk) from S (rows, Lk); row r is query r % Lq. With use_lse, P = exp(S scale - lse[r])
// (the backward's recomputation); otherwise the softmax, and lse[r] written if lse != nullptr.
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
causal_softmax_fwd(const data_t* __restrict__ s, int rows, int Lq, int Lk, scalar_t scale,
                   bool use_lse, data_t* __restrict__ p, scalar_t* __restrict__ lse) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;                          // the whole warp leaves together
    const data_t* sr = s + (i64)row * Lk;
    data_t* pr = p + (i64)row * Lk;
    const int seen = row % Lq + (Lk - Lq) + 1;        // keys 0 .. seen - 1 are visible

    scalar_t m, inv_l;
    if (use_lse) {                                    // P = exp(S scale - lse)
        m = lse[row];
        inv_l = 1;
    } else {
        scalar_t mx = neg_inf(scalar_t(0));           // pass 1: the row's max
        for (int j = lane; j < seen; j += WARP) mx = max(mx, load(sr[j]) * scale);
        m = warp_max(mx);
        scalar_t l = 0;                               // pass 2: sum of exp(S scale - m)
        for (int j = lane; j < seen; j += WARP) l += exp_(load(sr[j]) * scale - m);
        l = warp_sum(l);
        inv_l = scalar_t(1) / l;
        if (lse != nullptr && lane == 0) lse[row] = m + log_(l);
    }
    for (int j = lane; j < Lk; j += WARP)             // pass 3: P, 0 in the future
        pr[j] = store(j < seen ? exp_(load(sr[j]) * scale - m) * inv_l : scalar_t(0));
}

// dS (rows, Lk) = P (dP - D) scale, D = sum_c dO[r, c] O[r, c] over the d_head columns of row r.
// dS may be dP itself (in place: each element is read before it is written, by one thread).
extern "C" __global__ void __launch_bounds__(WARPS * WARP)
causal_softmax_bwd(const data_t* dp, const data_t* __restrict__ p,
                   const data_t* __restrict__ dout, const data_t* __restrict__ out,
                   int rows, int Lk, int d, scalar_t scale, data_t* ds) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    scalar_t D = 0;
    for (int c = lane; c < d; c += WARP) D += load(dout[(i64)row * d + c]) * load(out[(i64)row * d + c]);
    D = warp_sum(D);
    const i64 base = (i64)row * Lk;
    for (int j = lane; j < Lk; j += WARP)
        ds[base + j] = store(load(p[base + j]) * (load(dp[base + j]) - D) * scale);
}
