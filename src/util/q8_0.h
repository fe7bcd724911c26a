/* Q8_0, GGUF's 8-bit weights (ggml's block_q8_0): blocks of 32 values, each
 * stored as an f16 scale d and 32 int8 q, value j = d * q[j] (exact in f32:
 * 11 + 8 significant bits). The CPU matmul reads them repacked
 * (backend/cpu/matmul_q8_0.c); these helpers are for rows and for writing. */
#ifndef CAKE_Q8_0_H
#define CAKE_Q8_0_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "util/f16.h"

enum { CAKE_Q8_0_BLOCK = 32, CAKE_Q8_0_BYTES = 34 };

/* dst[0..n) = weights first..first+n of a Q8_0 array (first a multiple of
 * 32: a row of whole blocks), each block's scale converted once. */
static inline void cake_q8_0_to_f32_row(const void *w, size_t first, float *dst, size_t n) {
    const uint8_t *b = (const uint8_t *)w + first / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES;
    for (size_t i = 0; i < n; i += CAKE_Q8_0_BLOCK, b += CAKE_Q8_0_BYTES) {
        cake_f16 h;
        memcpy(&h, b, 2);
        const float d = cake_f16_to_f32(h);
        for (size_t j = 0; j < CAKE_Q8_0_BLOCK && i + j < n; j++)
            dst[i + j] = d * (float)(int8_t)b[2 + j];
    }
}

/* Quantizes 32 values into one block as llama.cpp's quantize_row_q8_0_ref
 * does: d = max |x| / 127, q = round(x / d). */
static inline void cake_q8_0_quantize_block(const float *x, uint8_t *dst) {
    float amax = 0.0f;
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const cake_f16 h = cake_f32_to_f16(d);
    memcpy(dst, &h, 2);
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) dst[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

#endif
