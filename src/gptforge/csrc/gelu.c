/* GPT-2's tanh GELU and its derivative for training on the CPU (gelu.py loads this file).

   gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
            = x s,  s = 1 / (1 + exp(-2u))           (0.5 (1 + tanh u) is the logistic function of 2u)
   gelu'(x) = s + 2 x s (1 - s) u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

   torch computes tanh per value with a call the compiler cannot vectorise on every build (on an AVX2 build it
   took three times as long as its erf GELU); here exp is a polynomial in plain arithmetic that the compiler
   turns into vector instructions at any level, so that both passes run at the speed of memory.
   The logistic form is also the more exact one where tanh(u) is close to -1 (0.5 (1 + tanh u) loses the
   low bits there). */

#include <stdint.h>
#include <string.h>

#define SQRT_2_OVER_PI 0.7978845608028654f
#define CUBIC 0.044715f
#define BLOCK 16384 /* values a thread takes at a time */

/* exp(x) for x in [-80, 80] (clamped), within about one unit in the last place: x = n ln2 + r with
   |r| <= ln2/2, exp(r) by its Taylor series to r^7 (the first term left out is below 2^-27 of the sum), times 2^n
   made from the exponent bits. ln2 is subtracted in two parts (the first exact in a float) so that r keeps its bits. */
static inline float exp_clamped(float x) {
    /* The compiler computes the clamped lanes' results apart and blends them in: at 88, 1 / (1 + e^88) would be a
       subnormal constant, and multiplying by one takes a slow microcode path on every vector (ten times slower on
       an Intel Xeon). At +-80 every value on the way stays normal; the GELU there is 0 or x all the same. */
    x = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);
    float t = x * 1.4426950408889634f + 0.5f;
    int32_t n = (int32_t)t - (t < 0.0f); /* floor(x / ln2 + 0.5) */
    float r = x - (float)n * 0.693359375f + (float)n * 2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float logistic_2u(float x) {
    float u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
    return 1.0f / (1.0f + exp_clamped(-2.0f * u));
}

static void gelu_block(const float *restrict x, float *restrict y, long n) {
    for (long i = 0; i < n; i++) y[i] = x[i] * logistic_2u(x[i]);
}

static void gelu_backward_block(const float *restrict x, const float *restrict g, float *restrict dx, long n) {
    for (long i = 0; i < n; i++) {
        float v = x[i], s = logistic_2u(v);
        float du = SQRT_2_OVER_PI * (1.0f + 3.0f * CUBIC * v * v);
        dx[i] = g[i] * (s + 2.0f * v * s * (1.0f - s) * du);
    }
}

/* y = gelu(x), n values */
void gptforge_gelu(const float *x, float *y, long n) {
    long blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (long b = 0; b < blocks; b++) {
        long start = b * BLOCK, size = n - start < BLOCK ? n - start : BLOCK;
        gelu_block(x + start, y + start, size);
    }
}

/* dx = g * gelu'(x), n values */
void gptforge_gelu_backward(const float *x, const float *g, float *dx, long n) {
    long blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (long b = 0; b < blocks; b++) {
        long start = b * BLOCK, size = n - start < BLOCK ? n - start : BLOCK;
        gelu_backward_block(x + start, g + start, dx + start, size);
    }
}
