// Device functions of the fused elementwise kernels (elementwise.py wraps each one in a
// cupy.ElementwiseKernel: one pass over memory, one launch, no temporaries).
// The NumPy spec of every function is in tinymoe/autograd/ops/unary.py (activations) and
// tinymoe/optim/adamw.py (the AdamW update). T is float or double (the activations are
// called with acc_t: float for float16 and bfloat16 arrays, see elementwise.py).

#define TINYMOE_SQRT1_2 0.70710678118654752440     // 1 / sqrt(2)
#define TINYMOE_INV_SQRT_2PI 0.39894228040143267794  // 1 / sqrt(2 pi)
#define TINYMOE_SQRT_2_OVER_PI 0.79788456080286535588  // sqrt(2 / pi)
#define TINYMOE_GELU_TANH_C 0.044715

// sigmoid(x) = 1 / (1 + e^-x), without overflow: e^-|x| <= 1.
template <typename T> __device__ T tinymoe_sigmoid(T x) {
    const T e = exp(-fabs(x));
    return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// GELU, exact: y = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
template <typename T> __device__ T tinymoe_gelu(T x) {
    return T(0.5) * x * (T(1) + erf(x * T(TINYMOE_SQRT1_2)));
}

// dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
template <typename T> __device__ T tinymoe_gelu_grad(T x) {
    const T cdf = T(0.5) * (T(1) + erf(x * T(TINYMOE_SQRT1_2)));
    const T pdf = exp(T(-0.5) * x * x) * T(TINYMOE_INV_SQRT_2PI);
    return cdf + x * pdf;
}

// GELU, tanh form: y = x/2 (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as y = x sigmoid(2u) (the same function: (1 + tanh u)/2 = sigmoid(2u)), which
// does not cancel in 1 + tanh u for large negative x.
template <typename T> __device__ T tinymoe_gelu_tanh(T x) {
    const T u = T(TINYMOE_SQRT_2_OVER_PI) * (x + T(TINYMOE_GELU_TANH_C) * x * x * x);
    return x * tinymoe_sigmoid(T(2) * u);
}

// dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//       = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2),   s = sigmoid(2u)
template <typename T> __device__ T tinymoe_gelu_tanh_grad(T x) {
    const T u = T(TINYMOE_SQRT_2_OVER_PI) * (x + T(TINYMOE_GELU_TANH_C) * x * x * x);
    const T s = tinymoe_sigmoid(T(2) * u);
    return s + T(2) * x * s * (T(1) - s) * T(TINYMOE_SQRT_2_OVER_PI) *
           (T(1) + T(3 * TINYMOE_GELU_TANH_C) * x * x);
}

// SiLU: y = x s,  s = sigmoid(x);  dy/dx = s (1 + x (1 - s))
template <typename T> __device__ T tinymoe_silu(T x) { return x * tinymoe_sigmoid(x); }

template <typename T> __device__ T tinymoe_silu_grad(T x) {
    const T s = tinymoe_sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
}

// softplus: y = log(1 + e^x) = max(x, 0) + log1p(e^-|x|);  dy/dx = sigmoid(x)
template <typename T> __device__ T tinymoe_softplus(T x) {
    return fmax(x, T(0)) + log1p(exp(-fabs(x)));
}

// One AdamW step for one element, in the order of optim/adamw.py's NumPy code:
//   p = p * (1 - lr wd);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps),   c1 = 1 - b1^t, c2 = 1 - b2^t
template <typename T>
__device__ void tinymoe_adamw(T& p, T& m, T& v, T g, T decay, T beta1, T one_minus_beta1,
                              T beta2, T one_minus_beta2, T step_size, T sqrt_c2, T eps) {
    p = p * decay;
    m = m * beta1 + one_minus_beta1 * g;
    v = v * beta2 + one_minus_beta2 * (g * g);
    p = p - step_size * m / (sqrt(v) / sqrt_c2 + eps);
}
