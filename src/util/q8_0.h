/* Q8_0, GGUF's 8-bit weights (ggml's block_q8_0): blocks of 32 values, each
 * stored as an f16 scale d and 32 int8 q, value j = d * q[j] (exact in f32:
 * 11 + 8 significant bits). The CPU matmul reads a copy repacked into
 * CAKE_DTYPE_Q8_0_X16 (below; backend/cpu/matmul_q8_0.c packs and
 * multiplies); these helpers read the file's blocks back as floats (embedding
 * rows, the CUDA backend's upload), look into the repacked layout and write
 * blocks. */
#ifndef CAKE_Q8_0_H
#define CAKE_Q8_0_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "util/f16.h"

enum { CAKE_Q8_0_BLOCK = 32, CAKE_Q8_0_BYTES = 34 };

/* CAKE_DTYPE_Q8_0_X16 (not a GGUF type): a Q8_0 matrix (n_out, n_in) with
 * its rows in groups of 16 (the last padded with zero rows), and per group
 * and block of 32 columns 544 bytes, as many as the 16 rows' Q8_0 blocks:
 *     16 f16 scales d (32 bytes),
 *     then for k4 = 0..7, for row i = 0..15: q[i][4 k4 .. 4 k4 + 3] + 128.
 * One 64-byte load holds 4 consecutive weights of 16 rows, the operand of
 * AVX512-VNNI's vpdpbusd with the rows in the lanes (matmul_q8_0.c). */
enum {
    CAKE_DTYPE_Q8_0_X16 = 1008,
    CAKE_Q8_0_X16_ROWS = 16,
    CAKE_Q8_0_X16_GROUP_BLOCK = CAKE_Q8_0_X16_ROWS * CAKE_Q8_0_BYTES, /* 544 bytes */
    CAKE_Q8_0_X16_QOFF = CAKE_Q8_0_X16_ROWS * 2, /* the weights after the scales */
};

/* dst[0..n) = elements first..first+n of a Q8_0 array (row-major, so
 * element e is row e / n_in, column e % n_in; rows are whole blocks). */
static inline void cake_q8_0_to_f32(const void *w, size_t first, float *dst, size_t n) {
    for (size_t i = 0; i < n;) {
        const size_t e = first + i, j0 = e % CAKE_Q8_0_BLOCK;
        const uint8_t *b = (const uint8_t *)w + e / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES;
        cake_f16 h;
        memcpy(&h, b, 2);
        const float d = cake_f16_to_f32(h);
        for (size_t j = j0; j < CAKE_Q8_0_BLOCK && i < n; j++, i++)
            dst[i] = d * (float)(int8_t)b[2 + j];
    }
}

/* Row r's block b of a CAKE_DTYPE_Q8_0_X16 matrix with nb blocks per row:
 * its scale, and its weight k (k = column, b = k / 32). */
static inline float cake_q8_0_x16_scale(const void *w, size_t nb, size_t r, size_t b) {
    cake_f16 h;
    memcpy(&h,
           (const uint8_t *)w + ((r / CAKE_Q8_0_X16_ROWS) * nb + b) * CAKE_Q8_0_X16_GROUP_BLOCK +
               2 * (r % CAKE_Q8_0_X16_ROWS),
           2);
    return cake_f16_to_f32(h);
}

static inline int cake_q8_0_x16_weight(const void *w, size_t nb, size_t r, size_t k) {
    const uint8_t *gb = (const uint8_t *)w + ((r / CAKE_Q8_0_X16_ROWS) * nb + k / CAKE_Q8_0_BLOCK) *
                                                 CAKE_Q8_0_X16_GROUP_BLOCK;
    const size_t j = k % CAKE_Q8_0_BLOCK;
    return (int)gb[CAKE_Q8_0_X16_QOFF + j / 4 * 64 + (r % CAKE_Q8_0_X16_ROWS) * 4 + j % 4] - 128;
}

/* roundf (halves away from zero) for |v| < 2^23, without the libm call that
 * GCC leaves roundf as (a third of requantizing a model went into it). */
static inline float cake_round_half_away(float v) {
    const float t = truncf(v), up = fabsf(v - t) >= 0.5f ? 1.0f : 0.0f; /* a select, no branch */
    return t + copysignf(up, v);
}

/* Quantizes 32 values into one block as llama.cpp's quantize_row_q8_0_ref
 * does: d = max |x| / 127, q = round(x / d). (The max is fmaxf's, NaNs
 * skipped, written as a compare that GCC keeps inline. Where llama.cpp's
 * float-to-int8 conversion is undefined, a NaN gives 0 and a value past
 * +-127 is clamped: the KV rows of a model with broken weights hold NaNs
 * and infinities.) */
static inline void cake_q8_0_quantize_block(const float *x, uint8_t *dst) {
    float m[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* four chains: a max is exact in any order */
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) {
        const float a = fabsf(x[j]);
        m[j % 4] = a > m[j % 4] ? a : m[j % 4];
    }
    const float m01 = m[1] > m[0] ? m[1] : m[0], m23 = m[3] > m[2] ? m[3] : m[2];
    const float amax = m23 > m01 ? m23 : m01;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const cake_f16 h = cake_f32_to_f16(d);
    memcpy(dst, &h, 2);
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) {
        const float r = cake_round_half_away(x[j] * id);
        dst[2 + j] = (uint8_t)(int8_t)(r >= 127.0f    ? 127.0f
                                       : r <= -127.0f ? -127.0f
                                       : r == r       ? r
                                                      : 0.0f);
    }
}

#endif
