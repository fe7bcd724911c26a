/* GGUF's quantized weight types read back as floats: Q8_0, the older Q4_0,
 * Q4_1, Q5_0, Q5_1, the k-quants Q2_K ... Q6_K and IQ4_NL, IQ4_XS: the types
 * of llama.cpp's Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, Q4_0 and
 * IQ4_NL/XS files (and of the fallbacks its quantizer picks where rows are
 * not whole k-quant blocks). The block layouts are ggml's (ggml-common.h);
 * the values are its dequantize_row_* ones, the same f32 operations in the
 * same order.
 *
 * The CPU backend multiplies Q8_0, Q3_K, Q4_K, Q5_K, IQ4_XS, Q4_0, IQ4_NL and
 * a Q6_K output matrix at their own bits (matmul_q8_0.c, matmul_kquant.c,
 * from repacked copies) and requantizes the others to Q8_0 once (model.c);
 * the CUDA backend converts them to f16 as they go up. */
#ifndef CAKE_DEQUANT_H
#define CAKE_DEQUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What errors about weight types list as readable. */
#define CAKE_WEIGHT_DTYPES                                                                         \
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS"

/* Whether GGUF type `type` is one of the quantized types above (Q8_0 too). */
bool cake_dequant_supported(int type);

/* A block of `type`: its bytes and its values (0 when not supported). */
size_t cake_dequant_block_bytes(int type);
size_t cake_dequant_block_elems(int type);

/* dst[0..n) = elements first..first+n of a row-major array of `type` blocks
 * (element e sits in block e / block size). Any range: a partial block at
 * either end is decoded whole and the part asked for copied. */
void cake_dequant_to_f32(int type, const void *src, size_t first, float *dst, size_t n);

/* The same in portable code only: where the build has AVX-512, the k-quants
 * and IQ4 decode in lanes, and the tests hold those to this bit for bit. */
void cake_dequant_to_f32_lanes(int type, const void *src, size_t first, float *dst, size_t n);

/* ggml's kvalues_iq4nl: the values IQ4_NL's and IQ4_XS's 4-bit indices
 * stand for. */
extern const int8_t cake_iq4_values[16];

/* 256 values of Q3_K, Q4_K, Q5_K, Q6_K or IQ4_XS (a block), or of Q4_0 or
 * IQ4_NL (8 blocks), in parts as the CPU's 3- to 6-bit layouts hold them
 * (backend/cpu/matmul_kquant.c): d and dmin (f16 bits), for each sub-block
 * j of 32 a scale for its first 16 values (sc), one for its last 16 (sc_hi;
 * the same but in Q6_K and Q3_K) and a min, and its 32 levels q_j,t, so
 * that value 32 j + t is d * (t < 16 ? sc : sc_hi)[j] * L(q_j,t) - dmin *
 * m[j]. Q4_K and Q5_K: their 6-bit scales and mins, levels 0..15 (Q5_K
 * 0..31), L(q) = q. Q6_K: its int8 scales, levels 0..63, L(q) = q - 32, dmin
 * and mins 0 (the kernel takes the 32 off); Q3_K likewise with its 6-bit
 * scales - 32, levels 0..7, L(q) = q - 4. IQ4_XS: scales ls - 32, dmin
 * 128 d and the mins the scales, levels the 4-bit indices, L(q) =
 * cake_iq4_values[q] + 128 (so the mins take the 128 off). The levels' low
 * 4 bits in pairs: byte t of pairs[j] holds q_j,t in its low nibble and
 * q_j,16+t in its high one; bit t of fifth[j] is q_j,t's fifth bit (Q5_K;
 * 0 for the others), top2[j][t] its bits 4-5 (Q6_K; q_j,t >> 4). Q4_0 and
 * IQ4_NL have a scale per 32 instead, d32[j] (f16 bits; d, dmin, sc, sc_hi
 * and m 0): value 32 j + t is d32[j] * L(q_j,t) with L(q) = q - 8 (Q4_0)
 * or cake_iq4_values[q] (IQ4_NL), levels the nibbles. */
typedef struct {
    uint16_t d, dmin;
    int8_t sc[8], sc_hi[8], m[8];
    uint8_t pairs[8][16];
    uint32_t fifth[8];
    uint8_t top2[8][32];
    uint16_t d32[8];
} cake_kquant_parts;
void cake_kquant_unpack(int type, const void *block, cake_kquant_parts *p);

#ifdef __cplusplus
}
#endif

#endif
