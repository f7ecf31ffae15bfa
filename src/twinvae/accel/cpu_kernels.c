/* Fused element-wise training kernels for the CPU (see cpu_kernels.py, which registers each
 * function as a torch operator: torch.ops.twinvae.*).
 *
 * LeakyReLU followed by inverted dropout, forward and backward, in one pass over memory. The
 * dropout mask is not stored: it is a hash of the element index and the seed, which the
 * backward pass recomputes. Every function works on the elements [start, stop) of a dense
 * tensor in memory order; results do not depend on the number of threads.
 *
 * bf16 values are handled as their uint16 bit patterns (rounding to nearest even).
 */
#include <stdint.h>
#include <string.h>

/* Loops over elements, rows or chunks are split between `threads` OpenMP threads. Built
 * with -fopenmp against the OpenMP runtime torch already loaded (libgomp.so.1), they run on
 * torch's own threads; without OpenMP the pragmas are ignored and the kernels run on one. */
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static)")
/* The same for element-wise loops whose output may be their input (in place): `simd` tells
 * the compiler that there is no dependence between iterations, which holds also then. */
#define PARALLEL_FOR_SIMD \
    _Pragma("omp parallel for simd num_threads(threads) schedule(static)")

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
        float scale, int threads
#define FACTOR(x) factor((x), i, key0, key1, threshold, slope, scale)

/* x and y may be the same buffer (in place), so they are not restrict. */
void leaky_dropout_forward_bf16(const uint16_t *x, uint16_t *y, KERNEL_ARGS) {
    PARALLEL_FOR_SIMD
    for (int64_t i = start; i < stop; ++i) {
        float value = bf16_to_float(x[i]);
        y[i] = float_to_bf16(value * FACTOR(value));
    }
}

void leaky_dropout_forward_f32(const float *x, float *y, KERNEL_ARGS) {
    PARALLEL_FOR_SIMD
    for (int64_t i = start; i < stop; ++i) y[i] = x[i] * FACTOR(x[i]);
}

/* The sign of the output y equals the sign of the input x wherever the element is kept (the
 * factor is then positive), and dropped elements get a zero gradient anyway, so y suffices. */
void leaky_dropout_backward_bf16(const uint16_t *restrict grad, const uint16_t *restrict y,
                                 uint16_t *restrict grad_x, KERNEL_ARGS) {
    PARALLEL_FOR
    for (int64_t i = start; i < stop; ++i)
        grad_x[i] = float_to_bf16(bf16_to_float(grad[i]) * FACTOR(bf16_to_float(y[i])));
}

void leaky_dropout_backward_f32(const float *restrict grad, const float *restrict y,
                                float *restrict grad_x, KERNEL_ARGS) {
    PARALLEL_FOR
    for (int64_t i = start; i < stop; ++i) grad_x[i] = grad[i] * FACTOR(y[i]);
}

/* Batch norm (training, batch statistics) followed by LeakyReLU, for channels-last tensors
 * seen as rows x channels. Statistics are summed in double per chunk of rows, and the caller
 * adds the chunks in a fixed order, so that they do not depend on the number of threads.
 * z = x * a + b is the normalised pre-activation (a = weight * invstd, b = bias - mean * a,
 * per channel). */

#define LOAD_bf16(p) bf16_to_float(p)
#define LOAD_f32(p) (p)
#define STORE_bf16(v) float_to_bf16(v)
#define STORE_f32(v) (v)

#define BATCH_NORM_LEAKY_KERNELS(SUFFIX, T)                                                     \
    void bn_stats_##SUFFIX(const T *restrict x, double *restrict sums,                          \
                           double *restrict squares, int64_t first_chunk, int64_t last_chunk,   \
                           int64_t rows, int64_t channels, int64_t chunk_rows, int threads) {   \
        PARALLEL_FOR                                                                            \
        for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {                        \
            double *sum = sums + chunk * channels, *square = squares + chunk * channels;        \
            for (int64_t c = 0; c < channels; ++c) sum[c] = square[c] = 0.0;                     \
            int64_t stop = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;   \
            for (int64_t r = chunk * chunk_rows; r < stop; ++r) {                               \
                const T *row = x + r * channels;                                                \
                for (int64_t c = 0; c < channels; ++c) {                                        \
                    double v = LOAD_##SUFFIX(row[c]);                                           \
                    sum[c] += v;                                                                \
                    square[c] += v * v;                                                         \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    void bn_leaky_forward_##SUFFIX(const T *restrict x, T *restrict y, const float *restrict a, \
                                   const float *restrict b, int64_t first_row, int64_t last_row,\
                                   int64_t channels, float slope, int threads) {                \
        PARALLEL_FOR                                                                            \
        for (int64_t r = first_row; r < last_row; ++r) {                                        \
            const T *in = x + r * channels;                                                     \
            T *out = y + r * channels;                                                          \
            for (int64_t c = 0; c < channels; ++c) {                                            \
                float z = LOAD_##SUFFIX(in[c]) * a[c] + b[c];                                   \
                out[c] = STORE_##SUFFIX(z > 0.0f ? z : z * slope);                              \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    /* Per chunk: sum of g' and of g' * xhat, g' = grad * LeakyReLU'(z). */                     \
    void bn_leaky_backward_stats_##SUFFIX(                                                      \
        const T *restrict grad, const T *restrict x, const float *restrict a,                   \
        const float *restrict b, const float *restrict mean, const float *restrict invstd,      \
        double *restrict sums, double *restrict products, int64_t first_chunk,                  \
        int64_t last_chunk, int64_t rows, int64_t channels, int64_t chunk_rows, float slope,    \
        int threads) {                                                                          \
        PARALLEL_FOR                                                                            \
        for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {                        \
            double *sum = sums + chunk * channels, *product = products + chunk * channels;      \
            for (int64_t c = 0; c < channels; ++c) sum[c] = product[c] = 0.0;                    \
            int64_t stop = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;   \
            for (int64_t r = chunk * chunk_rows; r < stop; ++r) {                               \
                const T *g_row = grad + r * channels, *x_row = x + r * channels;                \
                for (int64_t c = 0; c < channels; ++c) {                                        \
                    float v = LOAD_##SUFFIX(x_row[c]);                                          \
                    float z = v * a[c] + b[c];                                                  \
                    float g = LOAD_##SUFFIX(g_row[c]);                                          \
                    g = z > 0.0f ? g : g * slope;                                               \
                    sum[c] += g;                                                                \
                    product[c] += (double)g * ((v - mean[c]) * invstd[c]);                      \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    /* grad_x = k * (g' - mean_g - xhat * mean_gx), k = weight * invstd. */                     \
    void bn_leaky_backward_##SUFFIX(                                                            \
        const T *restrict grad, const T *restrict x, T *restrict grad_x,                        \
        const float *restrict a, const float *restrict b, const float *restrict mean,           \
        const float *restrict invstd, const float *restrict k, const float *restrict mean_g,    \
        const float *restrict mean_gx, int64_t first_row, int64_t last_row, int64_t channels,   \
        float slope, int threads) {                                                             \
        PARALLEL_FOR                                                                            \
        for (int64_t r = first_row; r < last_row; ++r) {                                        \
            const T *g_row = grad + r * channels, *x_row = x + r * channels;                    \
            T *out = grad_x + r * channels;                                                     \
            for (int64_t c = 0; c < channels; ++c) {                                            \
                float v = LOAD_##SUFFIX(x_row[c]);                                              \
                float z = v * a[c] + b[c];                                                      \
                float g = LOAD_##SUFFIX(g_row[c]);                                              \
                g = z > 0.0f ? g : g * slope;                                                   \
                float xhat = (v - mean[c]) * invstd[c];                                         \
                out[c] = STORE_##SUFFIX(k[c] * (g - mean_g[c] - xhat * mean_gx[c]));            \
            }                                                                                   \
        }                                                                                       \
    }

BATCH_NORM_LEAKY_KERNELS(bf16, uint16_t)
BATCH_NORM_LEAKY_KERNELS(f32, float)

/* Additive noise for augmentation: y = clamp(x + level[image] * table[r], 0, 1), r = 16 random
 * bits of element i (the same hash as the dropout masks) and table the 65536 quantiles of
 * the noise distribution (the caller passes those of a standard normal). */
void add_noise_f32(const float *restrict x, float *restrict y, const float *restrict levels,
                   const float *restrict table, int64_t start, int64_t stop, int64_t image_size,
                   uint32_t key0, uint32_t key1, int threads) {
    PARALLEL_FOR
    for (int64_t i = start; i < stop; ++i) {
        uint32_t random = hash32(hash32((uint32_t)i ^ key0) ^ key1) >> 16;
        float value = x[i] + levels[i / image_size] * table[random];
        y[i] = value < 0.0f ? 0.0f : (value > 1.0f ? 1.0f : value);
    }
}
