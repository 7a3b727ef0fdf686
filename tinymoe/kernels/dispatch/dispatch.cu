// Expert dispatch and combine in CUDA C (twin of numba_cuda.py; spec in reference.py).
// Slots are taken in priority order s = j T + t (choice-major, then token order); ranks
// come from counting in that fixed order, so plans and drops are deterministic.
// Compile-time constants (given with -D by cupy_raw.py): data_t (the rows' format: float,
// double, __half or __nv_bfloat16), scalar_t (weights and sums: float, or double for double
// rows), CHUNK, SLOT_WARPS. 16-bit rows are read widened to float and written rounded.
// The plan kernels walk slots one by one; the row kernels move 16-byte packs.

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

// --- the row kernels: rows move in packs of W elements ---------------------------------------
// W = PACK (16 bytes: 8 16-bit, 4 float32 or 2 float64 elements, one 128-bit load or store)
// when the host has checked that every row starts 16-byte aligned (`packed`: d a multiple of
// PACK, aligned bases); else W = 1. One thread per pack, so neighbouring threads read
// neighbouring 16 bytes of a row.

#define PACK (16 / (int)sizeof(data_t))

template <int W> struct alignas(W * sizeof(data_t)) Pack { data_t v[W]; };

template <int W> __device__ __forceinline__ Pack<W> pack_at(const data_t* row, i64 c) {
    return reinterpret_cast<const Pack<W>*>(row)[c];
}
template <int W> __device__ __forceinline__ void put_pack(data_t* row, i64 c, const Pack<W>& p) {
    reinterpret_cast<Pack<W>*>(row)[c] = p;
}

// out[r] = x[row_token[r]] (* scale[row_slot[r]]); a padding row of a static plan
// (row_token -1) is zeros.
template <int W>
__device__ void permute_packs(const data_t* __restrict__ x, const i64* __restrict__ row_token,
                              const scalar_t* __restrict__ scale, const i64* __restrict__ row_slot,
                              bool has_scale, i64 rows, int d, data_t* __restrict__ out) {
    const i64 packs = d / W, p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= rows * packs) return;
    const i64 r = p / packs, c = p % packs, token = row_token[r];
    Pack<W> v;
    if (token < 0) {
#pragma unroll
        for (int q = 0; q < W; ++q) v.v[q] = store(scalar_t(0));
    } else {
        v = pack_at<W>(x + token * d, c);
        const scalar_t w = has_scale ? scale[row_slot[r]] : scalar_t(1);
#pragma unroll
        for (int q = 0; q < W; ++q) v.v[q] = store(load(v.v[q]) * w);
    }
    put_pack<W>(out + r * d, c, v);
}

extern "C" __global__ void permute_rows(const data_t* __restrict__ x,
                                        const i64* __restrict__ row_token,
                                        const scalar_t* __restrict__ scale,
                                        const i64* __restrict__ row_slot, bool has_scale,
                                        i64 rows, int d, bool packed, data_t* __restrict__ out) {
    if (packed) permute_packs<PACK>(x, row_token, scale, row_slot, has_scale, rows, d, out);
    else permute_packs<1>(x, row_token, scale, row_slot, has_scale, rows, d, out);
}

// out[t] = sum_j weights[t, j] ys[slot_row[t, j]] over kept slots, j in order (no atomics).
template <int W>
__device__ void combine_packs(const data_t* __restrict__ ys, const i64* __restrict__ slot_row,
                              int k, const scalar_t* __restrict__ weights, bool has_weights,
                              i64 tokens, int d, data_t* __restrict__ out) {
    const i64 packs = d / W, p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= tokens * packs) return;
    const i64 t = p / packs, c = p % packs;
    scalar_t acc[W];
#pragma unroll
    for (int q = 0; q < W; ++q) acc[q] = 0;
    for (int j = 0; j < k; ++j) {
        const i64 r = slot_row[t * k + j];
        if (r < 0) continue;
        const scalar_t w = has_weights ? weights[t * k + j] : scalar_t(1);
        const Pack<W> y = pack_at<W>(ys + r * d, c);
#pragma unroll
        for (int q = 0; q < W; ++q) acc[q] += w * load(y.v[q]);
    }
    Pack<W> v;
#pragma unroll
    for (int q = 0; q < W; ++q) v.v[q] = store(acc[q]);
    put_pack<W>(out + t * d, c, v);
}

extern "C" __global__ void combine_rows(const data_t* __restrict__ ys,
                                        const i64* __restrict__ slot_row, int k,
                                        const scalar_t* __restrict__ weights, bool has_weights,
                                        i64 tokens, int d, bool packed, data_t* __restrict__ out) {
    if (packed) combine_packs<PACK>(ys, slot_row, k, weights, has_weights, tokens, d, out);
    else combine_packs<1>(ys, slot_row, k, weights, has_weights, tokens, d, out);
}

// dweights[t, j] = dout[t] . ys[slot_row[t, j]]: one warp per slot, fixed-order tree sum.
template <int W>
__device__ void slot_dot_packs(const data_t* __restrict__ dout, const data_t* __restrict__ ys,
                               const i64* __restrict__ slot_row, int T, int k, int d,
                               scalar_t* __restrict__ dweights) {
    const i64 slot = (i64)blockIdx.x * SLOT_WARPS + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (slot >= (i64)T * k) return;  // whole warps leave together
    const i64 t = slot / k, r = slot_row[slot];
    scalar_t acc = 0;
    if (r >= 0)
        for (int c = lane; c < d / W; c += WARP) {
            const Pack<W> a = pack_at<W>(dout + t * d, c), b = pack_at<W>(ys + r * d, c);
#pragma unroll
            for (int q = 0; q < W; ++q) acc += load(a.v[q]) * load(b.v[q]);
        }
#pragma unroll
    for (int off = WARP / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) dweights[slot] = acc;
}

extern "C" __global__ void slot_dot(const data_t* __restrict__ dout, const data_t* __restrict__ ys,
                                    const i64* __restrict__ slot_row, int T, int k, int d,
                                    bool packed, scalar_t* __restrict__ dweights) {
    if (packed) slot_dot_packs<PACK>(dout, ys, slot_row, T, k, d, dweights);
    else slot_dot_packs<1>(dout, ys, slot_row, T, k, d, dweights);
}
