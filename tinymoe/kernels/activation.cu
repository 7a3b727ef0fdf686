// The activations over whole contiguous arrays, forward and backward (CUDA C; elementwise.py
// launches them, elementwise.cu holds the functions they apply):
//
//   activation_forward    y[i]  = f(x[i])
//   activation_backward   dx[i] = g[i] f'(x[i])
//
// with f, f' = ACTIVATION, SLOPE (-D, e.g. tinymoe_gelu, tinymoe_gelu_grad). Each thread moves
// 16 bytes per load and per store (VEC = 8 bfloat16 / float16, 4 float, 2 double elements),
// walking the array in a grid-stride loop; the last n % VEC elements are done one by one.
// Values are widened to acc_t (float for the 16-bit formats) as they are read and rounded
// once as they are written, as the ElementwiseKernel forms do. Why not those: on an H100 a
// cupy.ElementwiseKernel took 320 us for 2^26 elements whatever its body or dtype ("y = x"
// included: its per-element index arithmetic), 0.84 TB/s in bfloat16 where a copy runs at
// 2.9 TB/s; these run at copy speed.
//
// Compile-time constants (-D, elementwise.py): data_t (float, double, __half,
// __nv_bfloat16), acc_t (float or double), ACTIVATION, SLOPE. The arrays' addresses must be
// 16-byte aligned (elementwise.py checks, and falls back to the ElementwiseKernel otherwise).

#define VEC (16 / sizeof(data_t))
typedef long long i64;

struct __align__(16) Pack { data_t v[VEC]; };

extern "C" __global__ void activation_forward(const data_t* __restrict__ x,
                                              data_t* __restrict__ y, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 packs = n / VEC;
    for (i64 i = first; i < packs; i += stride) {
        const Pack in = reinterpret_cast<const Pack*>(x)[i];
        Pack out;
#pragma unroll
        for (int j = 0; j < VEC; j++) out.v[j] = data_t(ACTIVATION(acc_t(in.v[j])));
        reinterpret_cast<Pack*>(y)[i] = out;
    }
    for (i64 i = packs * VEC + first; i < n; i += stride) y[i] = data_t(ACTIVATION(acc_t(x[i])));
}

extern "C" __global__ void activation_backward(const data_t* __restrict__ g,
                                               const data_t* __restrict__ x,
                                               data_t* __restrict__ dx, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 packs = n / VEC;
    for (i64 i = first; i < packs; i += stride) {
        const Pack gi = reinterpret_cast<const Pack*>(g)[i];
        const Pack xi = reinterpret_cast<const Pack*>(x)[i];
        Pack out;
#pragma unroll
        for (int j = 0; j < VEC; j++) out.v[j] = data_t(acc_t(gi.v[j]) * SLOPE(acc_t(xi.v[j])));
        reinterpret_cast<Pack*>(dx)[i] = out;
    }
    for (i64 i = packs * VEC + first; i < n; i += stride)
        dx[i] = data_t(acc_t(g[i]) * SLOPE(acc_t(x[i])));
}
