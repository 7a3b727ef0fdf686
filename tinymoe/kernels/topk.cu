// The k largest (or smallest) entries of every row, for rows of at most 64 entries (a
// router's scores over its experts): one thread per row, k passes of a selection. Ties go
// to the lower index, as a stable sort does; nothing is sorted, so no library call (CuPy's
// argsort is Thrust, which waits for the GPU) and no temporary memory. The spec is NumPy's
// stable argsort (tinymoe/autograd/ops/index.py :: TopK). T: float or double (a template).
template <typename T>
__global__ void topk_rows(const T* __restrict__ x, long long rows, int n, int k, bool largest,
                          T* __restrict__ values, long long* __restrict__ indices) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const T* r = x + row * n;
    unsigned long long taken = 0;  // bit i: entry i already chosen (n <= 64)
    for (int j = 0; j < k; ++j) {
        int best = -1;
        T bv = T(0);
        for (int i = 0; i < n; ++i) {
            if (taken >> i & 1ull) continue;
            const T v = r[i];
            if (best < 0 || (largest ? v > bv : v < bv)) { best = i; bv = v; }
        }
        taken |= 1ull << best;
        values[row * k + j] = bv;
        indices[row * k + j] = best;
    }
}
