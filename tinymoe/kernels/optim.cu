// Device code of the optimizer kernels (optim.py): the global gradient norm, and the AdamW
// step over flat buffers. None of them hands a number to the host: the norm, the
// "found inf" flag, the step count and the learning rate live in device
// memory, so a captured CUDA graph replays them unchanged. The NumPy spec of each is in
// tinymoe/optim/clip.py and tinymoe/optim/fused.py. T is the gradient's type (a template:
// float, double, or a half type with a conversion to double).

#ifndef NORM_THREADS
#define NORM_THREADS 256
#endif

// Stage 1 of ||g||^2: partial[b] = sum of g_i^2 over block b's grid-stride share, in double.
// Every block sums in a fixed order (no atomics): the same input gives the same bits.
template <typename T>
__global__ void sumsq_partials(const T* __restrict__ g, long long n, double* __restrict__ partial) {
    __shared__ double buf[NORM_THREADS];
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * NORM_THREADS;
    for (long long i = (long long)blockIdx.x * NORM_THREADS + threadIdx.x; i < n; i += stride) {
        const double x = (double)g[i];
        acc += x * x;
    }
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = buf[0];
}

// Stage 2 (one block): out = sqrt(sum of the partial sums), in a fixed order.
extern "C" __global__ void sqrt_sum(const double* __restrict__ partial, int n,
                                    double* __restrict__ out) {
    __shared__ double buf[NORM_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) acc += partial[i];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sqrt(buf[0]);
}

// AdamW's per-step scalars, one thread. Unless found_inf: t = ++step, and per group g
//   coef[g] = (1 - lr wd,  lr / c1,  sqrt(c2)),   c1 = 1 - beta1^t,  c2 = 1 - beta2^t
// hyper (groups, 4) = (lr, weight_decay, beta1, beta2), in double as the host computes them
// (the _rn intrinsics keep nvcc from fusing a multiply into an add: the host rounds twice).
extern "C" __global__ void adamw_prepare(const double* __restrict__ hyper, int groups,
                                         const bool* __restrict__ found_inf,
                                         long long* __restrict__ step, double* __restrict__ coef) {
    if (threadIdx.x != 0 || blockIdx.x != 0 || found_inf[0]) return;
    const long long t = step[0] + 1;
    step[0] = t;
    for (int g = 0; g < groups; ++g) {
        const double lr = hyper[4 * g], wd = hyper[4 * g + 1];
        const double c1 = 1.0 - pow(hyper[4 * g + 2], (double)t);
        const double c2 = 1.0 - pow(hyper[4 * g + 3], (double)t);
        coef[3 * g] = __dsub_rn(1.0, __dmul_rn(lr, wd));
        coef[3 * g + 1] = __ddiv_rn(lr, c1);
        coef[3 * g + 2] = sqrt(c2);
    }
}
