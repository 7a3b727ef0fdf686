// Expert dispatch and combine in CUDA C (twin of numba_cuda.py; spec in reference.py).
// Slots are taken in priority order s = j T + t (choice-major, then token order); ranks
// come from counting in that fixed order, so plans and drops are deterministic.
// Compile-time constants (given with -D by cupy_raw.py): data_t (the rows' format: float,
// double, __half or __nv_bfloat16), scalar_t (weights and sums: float, or double for double
// rows), CHUNK, SLOT_WARPS. 16-bit rows are read widened to float and written rounded.

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
#ifndef CHUNK
#define CHUNK 64
#endif
#ifndef SLOT_WARPS
#define SLOT_WARPS 4
#endif
#define WARP 32
typedef long long i64;

__device__ __forceinline__ scalar_t load(data_t v) { return static_cast<scalar_t>(v); }
__device__ __forceinline__ data_t store(scalar_t v) { return data_t(v); }

// hist[c, e] = slots of chunk c (priority order) that chose expert e. Indices >= E are
// skipped here (the caller raises on them before assign_rows runs).
extern "C" __global__ void count_chunks(const i64* __restrict__ expert_index, int T, int k,
                                        int E, int chunks, i64* __restrict__ hist) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const i64 end = min((i64)T * k, (i64)(c + 1) * CHUNK);
    for (i64 s = (i64)c * CHUNK; s < end; ++s) {
        const i64 e = expert_index[(s % T) * k + s / T];  // slot s = j T + t
        if (e >= 0 && e < E) hist[(i64)c * E + e] += 1;
    }
}

// Walk chunk c in priority order: rank = start[c, e]++; keep the slot if rank < counts[e].
extern "C" __global__ void assign_rows(const i64* __restrict__ expert_index, int T, int k,
                                       int E, int chunks, i64* __restrict__ start,
                                       const i64* __restrict__ counts,
                                       const i64* __restrict__ offsets,
                                       i64* __restrict__ slot_row, i64* __restrict__ row_slot) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const i64 end = min((i64)T * k, (i64)(c + 1) * CHUNK);
    for (i64 s = (i64)c * CHUNK; s < end; ++s) {
        const i64 t = s % T, j = s / T, e = expert_index[t * k + j];
        slot_row[t * k + j] = -1;
        if (e < 0 || e >= E) continue;  // empty slot (or an index a static plan did not check)
        const i64 rank = start[(i64)c * E + e]++;
        if (rank < counts[e]) {
            const i64 row = offsets[e] + rank;
            slot_row[t * k + j] = row;
            row_slot[row] = t * k + j;
        }
    }
}

// out[r] = x[row_token[r]] (* scale[row_slot[r]]): one block per row r, coalesced.
// A padding row of a static plan (row_token -1) is zeros.
extern "C" __global__ void permute_rows(const data_t* __restrict__ x,
                                        const i64* __restrict__ row_token,
                                        const scalar_t* __restrict__ scale,
                                        const i64* __restrict__ row_slot, bool has_scale,
                                        int d, data_t* __restrict__ out) {
    const i64 r = blockIdx.x;
    const i64 token = row_token[r];
    if (token < 0) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = store(scalar_t(0));
        return;
    }
    const data_t* src = x + token * d;
    const scalar_t w = has_scale ? scale[row_slot[r]] : scalar_t(1);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = store(load(src[i]) * w);
}

// out[t] = sum_j weights[t, j] ys[slot_row[t, j]] over kept slots, j in order (no atomics).
extern "C" __global__ void combine_rows(const data_t* __restrict__ ys,
                                        const i64* __restrict__ slot_row, int k,
                                        const scalar_t* __restrict__ weights, bool has_weights,
                                        int d, data_t* __restrict__ out) {
    const i64 t = blockIdx.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        scalar_t acc = 0;
        for (int j = 0; j < k; ++j) {
            const i64 r = slot_row[t * k + j];
            if (r >= 0) acc += (has_weights ? weights[t * k + j] : scalar_t(1)) * load(ys[r * d + i]);
        }
        out[t * d + i] = store(acc);
    }
}

// dweights[t, j] = dout[t] . ys[slot_row[t, j]]: one warp per slot, fixed-order tree sum.
extern "C" __global__ void slot_dot(const data_t* __restrict__ dout,
                                    const data_t* __restrict__ ys,
                                    const i64* __restrict__ slot_row, int T, int k, int d,
                                    scalar_t* __restrict__ dweights) {
    const i64 slot = (i64)blockIdx.x * SLOT_WARPS + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (slot >= (i64)T * k) return;  // whole warps leave together
    const i64 t = slot / k, r = slot_row[slot];
    scalar_t acc = 0;
    if (r >= 0)
        for (int i = lane; i < d; i += WARP) acc += load(dout[t * d + i]) * load(ys[r * d + i]);
#pragma unroll
    for (int off = WARP / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) dweights[slot] = acc;
}
