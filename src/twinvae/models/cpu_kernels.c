/* Fused element-wise training kernels for the CPU (see cpu_kernels.py).
 *
 * LeakyReLU followed by inverted dropout, forward and backward, in one pass over memory. The
 * dropout mask is not stored: it is a hash of the element index and the seed, which the
 * backward pass recomputes. Every function works on
 * the elements [start, stop) of a dense tensor in memory order, so that callers may split the
 * work between threads; results do not depend on the split.
 *
 * bf16 values are handled as their uint16 bit patterns (rounding to nearest even).
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

/* A 32-bit integer hash with low bias (the "lowbias32" constants of C. Wellons). */
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* The factor y / x of element i: (x > 0 ? 1 : slope) * (kept ? scale : 0); element i is kept
 * when the top 16 bits of its hash, keyed by the seed, are >= threshold. */
static inline float factor(float x, int64_t i, uint32_t key0, uint32_t key1, uint32_t threshold,
                           float slope, float scale) {
    uint32_t random = hash32(hash32((uint32_t)i ^ key0) ^ key1) >> 16;
    float kept = random >= threshold ? scale : 0.0f;
    return x > 0.0f ? kept : kept * slope;
}

#define KERNEL_ARGS                                                                        \
    int64_t start, int64_t stop, uint32_t key0, uint32_t key1, uint32_t threshold, float slope, \
        float scale
#define FACTOR(x) factor((x), i, key0, key1, threshold, slope, scale)

void leaky_dropout_forward_bf16(const uint16_t *restrict x, uint16_t *restrict y, KERNEL_ARGS) {
    for (int64_t i = start; i < stop; ++i) {
        float value = bf16_to_float(x[i]);
        y[i] = float_to_bf16(value * FACTOR(value));
    }
}

void leaky_dropout_forward_f32(const float *restrict x, float *restrict y, KERNEL_ARGS) {
    for (int64_t i = start; i < stop; ++i) y[i] = x[i] * FACTOR(x[i]);
}

/* The sign of the output y equals the sign of the input x wherever the element is kept (the
 * factor is then positive), and dropped elements get a zero gradient anyway, so y suffices. */
void leaky_dropout_backward_bf16(const uint16_t *restrict grad, const uint16_t *restrict y,
                                 uint16_t *restrict grad_x, KERNEL_ARGS) {
    for (int64_t i = start; i < stop; ++i)
        grad_x[i] = float_to_bf16(bf16_to_float(grad[i]) * FACTOR(bf16_to_float(y[i])));
}

void leaky_dropout_backward_f32(const float *restrict grad, const float *restrict y,
                                float *restrict grad_x, KERNEL_ARGS) {
    for (int64_t i = start; i < stop; ++i) grad_x[i] = grad[i] * FACTOR(y[i]);
}
