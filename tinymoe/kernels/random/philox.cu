// Philox4x32-10 on the device (the spec: reference.py, which matches Random123's known
// answers). Each thread computes the 4 words of its element's block from the counter
// (block low, block high, draw, step) and the key; nothing is stored between calls, so a
// captured CUDA graph that reads `step` from device memory draws new numbers every replay.

#define TINYMOE_PHILOX_M0 0xD2511F53u
#define TINYMOE_PHILOX_M1 0xCD9E8D57u
#define TINYMOE_PHILOX_W0 0x9E3779B9u
#define TINYMOE_PHILOX_W1 0xBB67AE85u

struct tinymoe_words { unsigned int w[4]; };

__device__ inline tinymoe_words tinymoe_philox(unsigned long long block, unsigned int draw,
                                                unsigned int step, unsigned int k0, unsigned int k1) {
    unsigned int c0 = (unsigned int)block, c1 = (unsigned int)(block >> 32), c2 = draw, c3 = step;
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += TINYMOE_PHILOX_W0; k1 += TINYMOE_PHILOX_W1; }
        const unsigned int hi0 = __umulhi(TINYMOE_PHILOX_M0, c0), lo0 = TINYMOE_PHILOX_M0 * c0;
        const unsigned int hi1 = __umulhi(TINYMOE_PHILOX_M1, c2), lo1 = TINYMOE_PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
    }
    tinymoe_words out = {{c0, c1, c2, c3}};
    return out;
}

// uniform(i) = (w >> 8) 2^-24 in [0, 1), w = word i % 4 of block i / 4
__device__ inline float tinymoe_uniform(long long i, unsigned int draw, unsigned int step,
                                        unsigned int k0, unsigned int k1) {
    const tinymoe_words r = tinymoe_philox((unsigned long long)i / 4, draw, step, k0, k1);
    return (float)(r.w[i % 4] >> 8) * 5.9604644775390625e-08f;
}

// normal(i): Box-Muller on the words (w0, w1) for lanes 0, 1 and (w2, w3) for lanes 2, 3
__device__ inline double tinymoe_normal(long long i, unsigned int draw, unsigned int step,
                                        unsigned int k0, unsigned int k1) {
    const tinymoe_words r = tinymoe_philox((unsigned long long)i / 4, draw, step, k0, k1);
    const int lane = (int)(i % 4), a = lane & 2;
    const double u1 = ((double)(r.w[a] >> 8) + 1.0) * 5.9604644775390625e-08;   // (0, 1]
    const double u2 = (double)(r.w[a + 1] >> 8) * 5.9604644775390625e-08;       // [0, 1)
    const double radius = sqrt(-2.0 * log(u1)), theta = 6.283185307179586 * u2;
    return radius * ((lane & 1) ? sin(theta) : cos(theta));
}
