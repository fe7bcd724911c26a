/* The CPU matmul for Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, Q4_0 and IQ4_NL
 * weights at their own bits (4.625, 4.625, 5.625, 6.625, 4.625, 4.5 and 4.5
 * a weight here) instead of a Q8_0 copy (8.5): the integer kernel of
 * matmul_q8_0.c with 3- to 6-bit weights.
 *
 * A Q4_K or Q5_K block is 256 values in 8 sub-blocks of 32; value k of
 * sub-block j is s_j q_k - m_j with q_k in 0..15 (Q5_K: 0..31), s_j = d sc_j
 * and m_j = dmin mn_j (d, dmin f16; sc_j, mn_j 6-bit; both products exact in
 * f32). IQ4_XS fits the same form: its value is s_j T[q_k] with s_j =
 * d (ls_j - 32) and T ggml's 16-value table; taking T[q] + 128 as the
 * (unsigned) level and m_j = 128 s_j (dmin = 128 d, exact; mn_j = ls_j -
 * 32), it is s_j (T[q] + 128) - m_j. Activations are quantized per block of
 * 32 as for Q8_0 (cake_q8_acts: dx, qx), so a sub-block contributes
 *     s_j dx isum - m_j dx sum qx,   isum = sum q_k qx_k, exact integers,
 * and each output is a chain over the blocks b = 0, 1, ... of
 *     y = fma((float)isum_b, s_b * dx_b, y),
 * then a second chain over them of y = fma(-m_b, dx_b * sum qx_b, y)
 * (products rounded to f32 first; the mins' terms in the first chain cost
 * ~20% of prefill, their own chain almost nothing).
 *
 * The others have no mins: their levels are offset instead, and each
 * integer sum starts at -offset times its sum of qx, so that it is
 * sum (q_k - offset) qx_k. Q6_K has a scale per 16, value s (q_k - 32),
 * q_k in 0..63, s = d sc (sc int8): each half of a block has its own sum
 * (|.| < 2^16, exact in f32) and the chain takes two steps a block,
 * y = fma((float)isum_lo, s_lo dx, y), then the same with the second
 * half's. Q3_K has one per 16 too, value d sc (q_k - 4), q_k in 0..7: the
 * halves' sums are multiplied by their sc and added in integers (< 2^20),
 * one step a block with d. Q4_0 and IQ4_NL have an f16 scale s per 32,
 * value s (q - 8), or s T[q] = s ((T[q] + 128) - 128): one step a block.
 * As for Q8_0 a token's row is the same bits whatever the batch, tiles and
 * threads, and the scalar twin below gives the same bits. No weight is
 * rounded: the result differs from the exact one by the activations'
 * rounding only (a Q8_0 copy also rounds every weight to 8 bits).
 *
 * The layouts (CAKE_DTYPE_Q4_K_X16, ... _Q3_K_X16), made once from the
 * file's blocks (cake_kquant_pack_x16, from cake_kquant_unpack's parts):
 * rows in groups of 16 (the last padded with zero rows), and per group and
 * block of 256 columns
 *     16 f16 d, then 16 f16 dmin (64 bytes; Q6_K, Q3_K: dmin 0; Q4_0,
 *         IQ4_NL: none);
 *     then per sub-block j = 0..7, in the order the kernel reads them:
 *     16 sc_j, then 16 mn_j (signed bytes; Q6_K, Q3_K: the scales of the
 *         sub-block's first 16 values, then its last 16's; Q4_0, IQ4_NL:
 *         16 f16 scales);
 *     for p = 0..3, for row i = 0..15, 4 bytes k = 0..3: low nibble
 *         q[i][32 j + 4 p + k], high nibble q[i][32 j + 16 + 4 p + k] (the
 *         levels' low 4 bits; IQ4_XS, IQ4_NL: the table indices);
 *     Q5_K: for p = 0..3 two 64-bit masks, bit 4 i + k the fifth bit of
 *         the level the low (then the high) nibble above holds;
 *     Q6_K: for the loads p = 0, 1 and then 2, 3, 64 bytes whose byte n
 *         holds the top 2 bits of the levels of the loads' byte n: load
 *         2q's low nibble's in bits 0-1, its high one's in 2-3, load 2q +
 *         1's in 4-5 and 6-7;
 * 2368 bytes (Q4_K, IQ4_XS, Q3_K), 2880 (Q5_K), 3392 (Q6_K) or 2304 (Q4_0,
 * IQ4_NL). (With each part in a plane of its own, three or four streams
 * through a group-block, the hardware prefetcher followed so badly that
 * Q6_K's decode ran at the speed of Q8_0's 8.5 bits.) One 64-byte load
 * holds 4 consecutive levels of 16 rows twice over: its low nibbles (AND
 * 0x0F) and its high ones (shift, AND), plus 16 where the mask bit says so
 * (Q5_K: a masked add), or with the top bits shifted to bits 4-5 OR'ed in
 * (Q6_K: one vpternlog; as two masks like Q5_K's they took twice as long in
 * decode), or looked up in the table (IQ4_XS, IQ4_NL: vpshufb), are two
 * operands of vpdpbusd with the rows in the lanes, as in the Q8_0 kernel,
 * unsigned as vpdpbusd wants them. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "model/dequant.h"
#include "model/gguf.h"

#if defined(CAKE_AVX512) && defined(__AVX512VNNI__)
#define KQ_VNNI 1
#endif

enum {
    KQ_ROWS = 16,                /* rows per group: the lanes */
    KQ_SUPER = 256,              /* columns per block */
    KQ_SUBS = 8,                 /* sub-blocks of 32 per block */
    KQ_HEAD = 64,                /* the 16 d and 16 dmin, before the sub-blocks */
    KQ_SUB_Q = 32,               /* a sub-block's nibbles after its scales */
    KQ_SUB_TOP = KQ_SUB_Q + 256, /* then its levels' top bits: 288 */
    KQ_MT = 6,                   /* tokens per register tile */
    KQ_NG = 2,                   /* row groups per register tile */
    KQ_TASK_GROUPS = 4,          /* row groups per task (64 rows) */
    KQ_K4 = 0,                   /* kinds of packed levels: Q4_K, */
    KQ_K5,                       /* Q5_K, */
    KQ_K6,                       /* Q6_K, */
    KQ_IQ4,                      /* IQ4_XS, */
    KQ_Q40,                      /* Q4_0, */
    KQ_IQ4NL,                    /* IQ4_NL, */
    KQ_K3,                       /* Q3_K */
};

/* The layouts, their files' types and kinds. */
static const struct {
    int x16, type, kind;
} layouts[] = {
    {CAKE_DTYPE_Q4_K_X16, CAKE_DTYPE_Q4_K, KQ_K4},
    {CAKE_DTYPE_Q5_K_X16, CAKE_DTYPE_Q5_K, KQ_K5},
    {CAKE_DTYPE_Q6_K_X16, CAKE_DTYPE_Q6_K, KQ_K6},
    {CAKE_DTYPE_IQ4_XS_X16, CAKE_DTYPE_IQ4_XS, KQ_IQ4},
    {CAKE_DTYPE_Q3_K_X16, CAKE_DTYPE_Q3_K, KQ_K3},
    {CAKE_DTYPE_Q4_0_X16, CAKE_DTYPE_Q4_0, KQ_Q40},
    {CAKE_DTYPE_IQ4_NL_X16, CAKE_DTYPE_IQ4_NL, KQ_IQ4NL},
};
enum { N_LAYOUTS = sizeof(layouts) / sizeof(layouts[0]) };

static int kind_of(int x16_dtype) {
    for (int i = 0; i < N_LAYOUTS; i++)
        if (layouts[i].x16 == x16_dtype) return layouts[i].kind;
    return KQ_K4;
}

/* The file's type of a layout, and back. */
static int gguf_type(int x16_dtype) {
    for (int i = 0; i < N_LAYOUTS; i++)
        if (layouts[i].x16 == x16_dtype) return layouts[i].type;
    return CAKE_DTYPE_Q4_K;
}

int cake_kquant_x16_for(int type) {
    for (int i = 0; i < N_LAYOUTS; i++)
        if (layouts[i].type == type) return layouts[i].x16;
    return 0;
}

/* Q4_0 and IQ4_NL: a scale per 32 (f16) where the others have sc and mn. */
static inline bool per_32(const int kind) {
    return kind == KQ_Q40 || kind == KQ_IQ4NL;
}

/* Q6_K and Q3_K: a scale per 16 (sc for the first 16 of a sub-block, sc_hi
 * in mn's place for the last 16). */
static inline bool per_16(const int kind) {
    return kind == KQ_K6 || kind == KQ_K3;
}

/* The kinds with a min per sub-block (their second chain), and what the
 * others' levels are offset by (value = s (level - offset)). */
static inline bool has_mins(const int kind) {
    return kind == KQ_K4 || kind == KQ_K5 || kind == KQ_IQ4;
}

static inline int level_offset(const int kind) {
    return kind == KQ_K6 ? 32 : kind == KQ_Q40 ? 8 : kind == KQ_K3 ? 4 : kind == KQ_IQ4NL ? 128 : 0;
}

/* Where sub-block `sub` starts in a group-block: after the head (none with
 * a scale per 32) and the sub-blocks before, each its scales, its nibbles
 * and 64 bytes a top bit (Q5_K 1, Q6_K 2). */
static inline size_t sub_at(int sub, const int kind) {
    const int top_bits = kind == KQ_K5 ? 1 : kind == KQ_K6 ? 2 : 0;
    return (per_32(kind) ? 0 : KQ_HEAD) + (size_t)sub * (KQ_SUB_TOP + 64 * top_bits);
}

static size_t group_super(int x16_dtype) {
    return sub_at(KQ_SUBS, kind_of(x16_dtype));
}

size_t cake_kquant_x16_size(int x16_dtype, int n_out, int n_in) {
    return (size_t)((n_out + KQ_ROWS - 1) / KQ_ROWS) * (size_t)(n_in / KQ_SUPER) *
           group_super(x16_dtype);
}

void cake_kquant_pack_x16(int x16_dtype, void *dst, const void *blocks, int n_out, int n_in) {
    const int type = gguf_type(x16_dtype);
    const size_t gs = group_super(x16_dtype);
    /* the file's bytes for 256 values: a block, or (Q4_0, IQ4_NL) 8 */
    const size_t block_bytes =
        cake_dequant_block_bytes(type) * KQ_SUPER / cake_dequant_block_elems(type);
    const int ns = n_in / KQ_SUPER, ng = (n_out + KQ_ROWS - 1) / KQ_ROWS, kind = kind_of(x16_dtype);
    uint8_t *d = dst;
    for (int g = 0; g < ng; g++)
        for (int sb = 0; sb < ns; sb++, d += gs) {
            memset(d, 0, gs); /* padding rows: scales 0, levels 0 */
            for (int i = 0; i < KQ_ROWS && g * KQ_ROWS + i < n_out; i++) {
                const uint8_t *blk = (const uint8_t *)blocks +
                                     ((size_t)(g * KQ_ROWS + i) * ns + (size_t)sb) * block_bytes;
                cake_kquant_parts parts;
                cake_kquant_unpack(type, blk, &parts);
                if (!per_32(kind)) {
                    memcpy(d + 2 * i, &parts.d, 2);
                    memcpy(d + 32 + 2 * i, &parts.dmin, 2);
                }
                for (int j = 0; j < KQ_SUBS; j++) {
                    uint8_t *sub = d + sub_at(j, kind);
                    if (per_32(kind)) {
                        memcpy(sub + 2 * i, &parts.d32[j], 2);
                    } else {
                        sub[i] = (uint8_t)parts.sc[j];
                        sub[16 + i] = (uint8_t)(per_16(kind) ? parts.sc_hi[j] : parts.m[j]);
                    }
                    /* the pairs' bytes 4p..4p+3 are the row's 4 bytes of load p */
                    for (int p = 0; p < 4; p++)
                        memcpy(sub + KQ_SUB_Q + 64 * p + 4 * i, parts.pairs[j] + 4 * p, 4);
                    /* Q5_K: load p's masks get the fifth bits of levels 4p..
                     * (low) and 16 + 4p.. (high) at bits 4i.. */
                    for (int p = 0; parts.fifth[j] && p < 4; p++)
                        for (int h = 0; h < 2; h++) {
                            uint8_t *at = sub + KQ_SUB_TOP + 16 * p + 8 * h;
                            uint64_t mask;
                            memcpy(&mask, at, 8);
                            mask |= (uint64_t)(parts.fifth[j] >> (16 * h + 4 * p) & 0xF) << (4 * i);
                            memcpy(at, &mask, 8);
                        }
                    /* Q6_K: byte k of the row's 4 in pair q of loads is
                     * top2 of levels 8q + k, 16 + 8q + k, 8q + 4 + k and
                     * 16 + 8q + 4 + k, from bit 0 up: 8 bytes at a time,
                     * t = lo | hi << 2, then t's bytes k | bytes 4 + k << 4
                     * (values below 16: no carries across bytes) */
                    for (int q = 0; kind == KQ_K6 && q < 2; q++) {
                        uint64_t lo, hi;
                        memcpy(&lo, parts.top2[j] + 8 * q, 8);
                        memcpy(&hi, parts.top2[j] + 16 + 8 * q, 8);
                        const uint64_t t = lo | hi << 2;
                        const uint32_t four = (uint32_t)t | (uint32_t)(t >> 32) << 4;
                        memcpy(sub + KQ_SUB_TOP + 64 * q + 4 * i, &four, 4);
                    }
                }
            }
        }
}

/* Row r of such a matrix with ns blocks of 256 per row: the group-block
 * holding column k, its level there, and the scale s and min m of the
 * sub-block of 32 holding k. */
static const uint8_t *group_block(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    return (const uint8_t *)w + ((r / KQ_ROWS) * ns + k / KQ_SUPER) * group_super(x16_dtype);
}

int cake_kquant_x16_level(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    const int kind = kind_of(x16_dtype);
    const size_t e = k % KQ_SUPER, c = e % 32, p = c % 16 / 4, bit = 4 * (r % KQ_ROWS) + c % 4;
    const uint8_t *sub = group_block(x16_dtype, w, ns, r, k) + sub_at((int)(e / 32), kind);
    const uint8_t b = sub[KQ_SUB_Q + 64 * p + bit];
    int q = c < 16 ? b & 0xF : b >> 4;
    if (kind == KQ_K5) {
        const uint8_t *mask = sub + KQ_SUB_TOP + 16 * p + (c < 16 ? 0 : 8);
        q |= (mask[bit / 8] >> bit % 8 & 1) << 4;
    } else if (kind == KQ_K6) {
        const int f = 2 * (p % 2) + (c < 16 ? 0 : 1);
        q |= (sub[KQ_SUB_TOP + 64 * (p / 2) + bit] >> (2 * f) & 3) << 4;
    }
    return kind == KQ_IQ4 || kind == KQ_IQ4NL ? cake_iq4_values[q] + 128 : q;
}

static float f16_at(const uint8_t *p) {
    cake_f16 h;
    memcpy(&h, p, 2);
    return cake_f16_to_f32(h);
}

/* The scale's parts at row r, column k (not for Q4_0, IQ4_NL): the row's d
 * and the sub-block's (Q6_K, Q3_K: half's) integer scale. */
static float d_of(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    return f16_at(group_block(x16_dtype, w, ns, r, k) + 2 * (r % KQ_ROWS));
}

static int sc_of(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    const int kind = kind_of(x16_dtype);
    const uint8_t *sub =
        group_block(x16_dtype, w, ns, r, k) + sub_at((int)(k % KQ_SUPER / 32), kind);
    return (int8_t)sub[(per_16(kind) && k % 32 >= 16 ? 16 : 0) + r % KQ_ROWS];
}

float cake_kquant_x16_scale(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    const int kind = kind_of(x16_dtype);
    if (per_32(kind))
        return f16_at(group_block(x16_dtype, w, ns, r, k) + sub_at((int)(k % KQ_SUPER / 32), kind) +
                      2 * (r % KQ_ROWS));
    return (float)sc_of(x16_dtype, w, ns, r, k) * d_of(x16_dtype, w, ns, r, k);
}

float cake_kquant_x16_min(int x16_dtype, const void *w, size_t ns, size_t r, size_t k) {
    const int kind = kind_of(x16_dtype);
    if (!has_mins(kind)) /* the levels' offset: a power of 2, exact */
        return (float)level_offset(kind) * cake_kquant_x16_scale(x16_dtype, w, ns, r, k);
    const uint8_t *gb = group_block(x16_dtype, w, ns, r, k);
    const size_t i = r % KQ_ROWS;
    const uint8_t *sub = gb + sub_at((int)(k % KQ_SUPER / 32), kind);
    return (float)(int8_t)sub[16 + i] * f16_at(gb + 32 + i * 2);
}

/* ===================== reference and scalar twin ===================== */

int cake_matmul_kquant_ref(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                           int n_in, int n_out) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / KQ_SUPER;
    for (int t = 0; t < n_tokens; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0.0;
            for (int b = 0; b < nb; b++) {
                int8_t q[CAKE_Q8_0_BLOCK];
                float dx;
                int32_t c;
                cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q,
                                             &dx, &c);
                (void)c;
                for (int h = 0; h < 2; h++) { /* halves of 16: Q6_K's scales */
                    const size_t k0 = (size_t)b * CAKE_Q8_0_BLOCK + 16 * (size_t)h;
                    long isum = 0, qsum = 0;
                    for (int k = 0; k < 16; k++) {
                        isum += (long)cake_kquant_x16_level(x16_dtype, w, ns, n, k0 + k) *
                                q[16 * h + k];
                        qsum += q[16 * h + k];
                    }
                    s += (double)dx *
                         ((double)cake_kquant_x16_scale(x16_dtype, w, ns, n, k0) * (double)isum -
                          (double)cake_kquant_x16_min(x16_dtype, w, ns, n, k0) * (double)qsum);
                }
            }
            y[(size_t)t * n_out + n] = (float)s;
        }
    return 0;
}

/* Rows [r0, r1) of every token in the kernel's order. */
static void lanes_rows(int x16_dtype, float *y, const float *x, const uint8_t *w, int n_tokens,
                       int n_in, int n_out, int r0, int r1) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / KQ_SUPER, kind = kind_of(x16_dtype),
              off = level_offset(kind), steps = kind == KQ_K6 ? 2 : 1, width = 32 / steps;
    for (int t = 0; t < n_tokens; t++) {
        float *yt = y + (size_t)t * n_out;
        for (int n = r0; n < r1; n++) yt[n] = 0.0f;
        for (int b = 0; b < nb; b++) { /* the scales' chain */
            int8_t q[CAKE_Q8_0_BLOCK];
            float dx;
            int32_t c;
            cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q, &dx,
                                         &c);
            const size_t k0 = (size_t)b * CAKE_Q8_0_BLOCK;
            for (int n = r0; n < r1; n++) {
                if (kind == KQ_K3) { /* the halves' sums times their scales, then one step */
                    int isum = 0;
                    for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                        isum += (cake_kquant_x16_level(x16_dtype, w, ns, n, k0 + k) - off) * q[k] *
                                sc_of(x16_dtype, w, ns, n, k0 + k);
                    yt[n] = fmaf((float)isum, d_of(x16_dtype, w, ns, n, k0) * dx, yt[n]);
                    continue;
                }
                for (int h = 0; h < steps; h++) { /* Q6_K: a step per half */
                    int isum = 0;
                    for (int k = width * h; k < width * (h + 1); k++)
                        isum += (cake_kquant_x16_level(x16_dtype, w, ns, n, k0 + k) - off) * q[k];
                    yt[n] = fmaf((float)isum,
                                 cake_kquant_x16_scale(x16_dtype, w, ns, n, k0 + width * h) * dx,
                                 yt[n]);
                }
            }
        }
        for (int b = 0; has_mins(kind) && b < nb; b++) { /* then the mins' */
            int8_t q[CAKE_Q8_0_BLOCK];
            float dx;
            int32_t c;
            cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q, &dx,
                                         &c);
            const float dx_sum = dx * (float)(c / 128);
            for (int n = r0; n < r1; n++)
                yt[n] = fmaf(-cake_kquant_x16_min(x16_dtype, w, ns, n, (size_t)b * CAKE_Q8_0_BLOCK),
                             dx_sum, yt[n]);
        }
    }
}

void cake_matmul_kquant_lanes(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                              int n_in, int n_out) {
    lanes_rows(x16_dtype, y, x, w, n_tokens, n_in, n_out, 0, n_out);
}

/* ===================== the threaded kernel ===================== */

typedef struct {
    float *y;
    const float *x;
    const uint8_t *w;
    int x16_dtype;
    int kind; /* KQ_K4, ...: how the packed levels are read */
    size_t group_super;
    int T, n_in, n_out, nb, ns;
    cake_q8_acts a;
    float *dx_sum;   /* (T, nb) each block's scale times its sum of q: the mins' factor */
    int32_t *acc0;   /* kinds without mins instead: (T, nb, 2) the integer sums' starts,
                      * -offset x the sum of q of each half-block (Q6_K) or of the block
                      * (then 0 for its second half) */
    uint8_t *panels; /* NULL, or per thread one task's blocks unpacked (unpack_block) */
} kq_job;

#ifdef KQ_VNNI

#define UNROLL _Pragma("GCC unroll 8")

/* A batch of at least this many tokens unpacks each task's levels to bytes
 * first (below); fewer read the packed levels where they are. */
#define KQ_UNPACK_MIN_TOKENS 16

/* The 16 rows' d (at gb; dmin at gb + 32), as f32 lanes. */
CAKE_INLINE __m512 d_lanes(const uint8_t *gb) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
}

/* The 16 rows' scales s = d sc of sub-block `sub` of group-block gb (second
 * false), or (second true) its mins m = dmin mn (Q6_K: the scales of its
 * last 16 values, d sc_hi), as f32 lanes. Q4_0, IQ4_NL: the sub-block's d. */
CAKE_INLINE __m512 scale_lanes(const uint8_t *gb, int sub, bool second, const int kind) {
    if (per_32(kind))
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb + sub_at(sub, kind))));
    const __m512 d = d_lanes(gb + (second && !per_16(kind) ? 32 : 0));
    const __m128i b =
        _mm_loadu_si128((const __m128i *)(gb + sub_at(sub, kind) + (second ? 16 : 0)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

/* Q3_K's levels q (0..7 in each byte) as the unpacked tiles take them: u =
 * 128 - (q - 4) sc in each byte (0..252: (q - 4) sc is in -124..128), sc16
 * the 16 rows' scales. Then sum u qx - 128 sum qx is minus the packed
 * tile's sc_lo A_lo + sc_hi A_hi, and with -d as the panel's scale the step
 * is the same product, both factors negated: the same bits. */
CAKE_INLINE __m512i q3_unsigned(__m512i q, const uint8_t *sc16) {
    /* each row's scale in its 4 bytes, and in its 2 words */
    const __m512i scb = _mm512_mullo_epi32(
                      _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc16)),
                      _mm512_set1_epi32(0x01010101)),
                  scw = _mm512_srai_epi16(_mm512_slli_epi16(scb, 8), 8),
                  base = _mm512_add_epi16(_mm512_set1_epi16(128), _mm512_slli_epi16(scw, 2));
    /* q sc of the even, then the odd bytes, in words (|q sc| <= 224) */
    const __m512i even = _mm512_maddubs_epi16(q, _mm512_and_si512(scb, _mm512_set1_epi16(0x00FF))),
                  odd = _mm512_maddubs_epi16(
                      q, _mm512_and_si512(scb, _mm512_set1_epi16((short)0xFF00)));
    return _mm512_or_si512(_mm512_sub_epi16(base, even),
                           _mm512_slli_epi16(_mm512_sub_epi16(base, odd), 8));
}

/* The levels of load p of sub-block `sub` of group-block gb: lo, the 4
 * consecutive levels 4p.. of each row, hi those at 16 + 4p.. */
CAKE_INLINE void levels_of(const uint8_t *gb, int sub, int p, const int kind, __m512i *lo,
                           __m512i *hi) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t *at = gb + sub_at(sub, kind);
    const __m512i v = _mm512_loadu_si512(at + KQ_SUB_Q + 64 * p);
    *lo = _mm512_and_si512(v, low4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if (kind == KQ_IQ4 ||
        kind == KQ_IQ4NL) { /* the table + 128 (sign bits flipped), per 128 bits */
        const __m512i table = _mm512_broadcast_i32x4(_mm_xor_si128(
            _mm_loadu_si128((const __m128i *)cake_iq4_values), _mm_set1_epi8((char)0x80)));
        *lo = _mm512_shuffle_epi8(table, *lo);
        *hi = _mm512_shuffle_epi8(table, *hi);
    }
    if (kind == KQ_K5) {
        const __m512i sixteen = _mm512_set1_epi8(16);
        uint64_t k_lo, k_hi;
        memcpy(&k_lo, at + KQ_SUB_TOP + 16 * p, 8);
        memcpy(&k_hi, at + KQ_SUB_TOP + 16 * p + 8, 8);
        *lo = _mm512_mask_add_epi8(*lo, k_lo, *lo, sixteen);
        *hi = _mm512_mask_add_epi8(*hi, k_hi, *hi, sixteen);
    }
    if (kind == KQ_K6) { /* each pair of top bits to bits 4-5 (16-bit shifts: the
                          * AND drops what crosses bytes), OR'ed in */
        const __m512i top2 = _mm512_set1_epi8(0x30),
                      h = _mm512_loadu_si512(at + KQ_SUB_TOP + 64 * (p / 2));
        const __m512i h_lo = p % 2 ? h : _mm512_slli_epi16(h, 4),
                      h_hi = p % 2 ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
        *lo = _mm512_ternarylogic_epi32(*lo, h_lo, top2, 0xF8); /* lo | (h_lo & top2) */
        *hi = _mm512_ternarylogic_epi32(*hi, h_hi, top2, 0xF8);
    }
}

/* One group's block of 256 unpacked: per sub-block 8 steps of 64 bytes (4
 * consecutive levels of each of the 16 rows, as the Q8_0 layout has them,
 * less its +128), then the 16 scales and the 16 mins (Q6_K: second scales)
 * as f32. */
enum { KQ_UNPACKED_SUB = 8 * 64 + 2 * 64, KQ_UNPACKED_SUPER = KQ_SUBS * KQ_UNPACKED_SUB };

static void unpack_block(uint8_t *dst, const uint8_t *gb, int kind) {
    for (int sub = 0; sub < KQ_SUBS; sub++, dst += KQ_UNPACKED_SUB) {
        for (int p = 0; p < 4; p++) {
            __m512i lo, hi;
            switch (kind) { /* each its constant, for the inlined levels_of */
            case KQ_K5:
                levels_of(gb, sub, p, KQ_K5, &lo, &hi);
                break;
            case KQ_K6:
                levels_of(gb, sub, p, KQ_K6, &lo, &hi);
                break;
            case KQ_K3:
                levels_of(gb, sub, p, KQ_K3, &lo, &hi);
                break;
            case KQ_IQ4:
                levels_of(gb, sub, p, KQ_IQ4, &lo, &hi);
                break;
            case KQ_Q40:
                levels_of(gb, sub, p, KQ_Q40, &lo, &hi);
                break;
            case KQ_IQ4NL:
                levels_of(gb, sub, p, KQ_IQ4NL, &lo, &hi);
                break;
            default:
                levels_of(gb, sub, p, KQ_K4, &lo, &hi);
            }
            if (kind == KQ_K3) {
                lo = q3_unsigned(lo, gb + sub_at(sub, KQ_K3));
                hi = q3_unsigned(hi, gb + sub_at(sub, KQ_K3) + 16);
            }
            _mm512_storeu_si512(dst + 64 * p, lo);
            _mm512_storeu_si512(dst + 64 * (p + 4), hi);
        }
        if (kind == KQ_K3) { /* -d (q3_unsigned) */
            _mm512_storeu_ps(dst + 512, _mm512_sub_ps(_mm512_setzero_ps(), d_lanes(gb)));
            continue;
        }
        _mm512_storeu_ps(dst + 512, scale_lanes(gb, sub, false, kind));
        if (has_mins(kind) || kind == KQ_K6) /* the only tiles that read a second lane */
            _mm512_storeu_ps(dst + 576, scale_lanes(gb, sub, true, kind));
    }
}

/* Each lane's chain its step for the accumulators acc of block b: f +=
 * (float)acc * (s dx). */
CAKE_INLINE void chain_step(const kq_job *j, __m512 f[KQ_MT][KQ_NG], __m512i acc[KQ_MT][KQ_NG],
                            const __m512 *s, int t0, int b, const int MT, const int NG) {
    UNROLL for (int i = 0; i < MT; i++) {
        const __m512 dx = _mm512_set1_ps(j->a.d[(size_t)(t0 + i) * j->nb + b]);
        UNROLL for (int g = 0; g < NG; g++) f[i][g] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][g]), _mm512_mul_ps(s[g], dx), f[i][g]);
    }
}

/* The accumulators' start for block b: 0, or (kinds without mins) -offset x
 * the sum of q of its half `half` (Q6_K, packed Q3_K) or of the block (half
 * 0), so that they sum (level - offset) qx. */
CAKE_INLINE void start_acc(const kq_job *j, __m512i acc[KQ_MT][KQ_NG], int t0, int b, int half,
                           const int MT, const int NG, const int kind) {
    UNROLL for (int i = 0; i < MT; i++) {
        const __m512i a0 =
            has_mins(kind) ? _mm512_setzero_si512()
                           : _mm512_set1_epi32(j->acc0[((size_t)(t0 + i) * j->nb + b) * 2 + half]);
        UNROLL for (int g = 0; g < NG; g++) acc[i][g] = a0;
    }
}

/* MT tokens (t0..) x NG row groups (g0..): per sub-block 8 vpdpbusd steps
 * per token, then each lane's chain its FMA (Q6_K: one per half, after steps
 * 4 and 8); then the mins' chain. The levels come from lv[g] (unpacked: a
 * group's blocks, one after another) or from the packed layout: 4 loads of
 * 64 bytes, each 2 steps (low, then high nibbles); one token (decode), and
 * Q6_K and Q3_K always, then puts the high nibbles' steps in second
 * accumulators, added at the end (integers: the same bits, two dependency
 * chains instead of one; Q3_K: each times its half's scale), or (Q6_K)
 * chained after the first. */
CAKE_INLINE void kq_tile(const kq_job *j, const uint8_t *const *lv, int t0, int g0, const int MT,
                         const int NG, const bool unpacked, const int kind) {
    const int ns = j->ns, n_in = j->n_in;
    const bool split = MT == 1 || per_16(kind);
    __m512 f[KQ_MT][KQ_NG];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) f[i][g] =
        _mm512_setzero_ps();
    for (int sb = 0; sb < ns; sb++) {
        const uint8_t *wb[KQ_NG];
        UNROLL for (int g = 0; g < NG; g++) wb[g] =
            unpacked ? lv[g] + (size_t)sb * KQ_UNPACKED_SUPER
                     : j->w + ((size_t)(g0 + g) * ns + sb) * j->group_super;
        for (int sub = 0; sub < KQ_SUBS; sub++) {
            const int b = sb * KQ_SUBS + sub;
            __m512i acc[KQ_MT][KQ_NG], hi_acc[KQ_MT][KQ_NG];
            __m512 s[KQ_NG];
            start_acc(j, acc, t0, b, 0, MT, NG, kind);
            if (split && !unpacked) start_acc(j, hi_acc, t0, b, 1, MT, NG, kind);
            const int8_t *xb = j->a.q + (size_t)t0 * n_in + (size_t)b * CAKE_Q8_0_BLOCK;
            if (unpacked) {
                UNROLL for (int st = 0; st < 8; st++) {
                    if (kind == KQ_K6 && st == 4) { /* the first half's step */
                        UNROLL for (int g = 0; g < NG; g++) s[g] =
                            _mm512_loadu_ps(wb[g] + KQ_UNPACKED_SUB * sub + 512);
                        chain_step(j, f, acc, s, t0, b, MT, NG);
                        start_acc(j, acc, t0, b, 1, MT, NG, kind);
                    }
                    __m512i wv[KQ_NG];
                    UNROLL for (int g = 0; g < NG; g++) wv[g] =
                        _mm512_loadu_si512(wb[g] + KQ_UNPACKED_SUB * sub + 64 * st);
                    UNROLL for (int i = 0; i < MT; i++) {
                        int32_t four;
                        memcpy(&four, xb + (size_t)i * n_in + 4 * st, 4);
                        const __m512i xv = _mm512_set1_epi32(four);
                        UNROLL for (int g = 0; g < NG; g++) acc[i][g] =
                            _mm512_dpbusd_epi32(acc[i][g], wv[g], xv);
                    }
                }
            } else {
                /* this sub-block's bytes of the next block (and its head
                 * with the first), which the hardware prefetcher fetches
                 * late: 1.15 -> 1.35x Q8_0's speed for Q6_K, 1.5 -> 1.8x
                 * for Q4_K (one token, 2 cores) */
                const size_t gs = sub_at(KQ_SUBS, kind), sub_bytes = sub_at(1, kind) - KQ_HEAD;
                UNROLL for (int g = 0; g < NG; g++) {
                    const char *next = (const char *)wb[g] + gs + sub_at(sub, kind);
                    if (sub == 0) _mm_prefetch((const char *)wb[g] + gs, _MM_HINT_T0);
                    UNROLL for (size_t at = 0; at < sub_bytes; at += 64)
                        _mm_prefetch(next + at, _MM_HINT_T0);
                }
                UNROLL for (int p = 0; p < 4; p++) {
                    __m512i lo[KQ_NG], hi[KQ_NG];
                    UNROLL for (int g = 0; g < NG; g++)
                        levels_of(wb[g], sub, p, kind, &lo[g], &hi[g]);
                    UNROLL for (int i = 0; i < MT; i++) {
                        int32_t x_lo, x_hi;
                        memcpy(&x_lo, xb + (size_t)i * n_in + 4 * p, 4);
                        memcpy(&x_hi, xb + (size_t)i * n_in + 16 + 4 * p, 4);
                        const __m512i vlo = _mm512_set1_epi32(x_lo), vhi = _mm512_set1_epi32(x_hi);
                        UNROLL for (int g = 0; g < NG; g++) {
                            acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], lo[g], vlo);
                            if (split)
                                hi_acc[i][g] = _mm512_dpbusd_epi32(hi_acc[i][g], hi[g], vhi);
                            else
                                acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], hi[g], vhi);
                        }
                    }
                }
                if (kind == KQ_K3) { /* the halves' sums times their scales: the block's */
                    UNROLL for (int g = 0; g < NG; g++) {
                        const uint8_t *sc = wb[g] + sub_at(sub, kind);
                        const __m512i sc_lo = _mm512_cvtepi8_epi32(
                                          _mm_loadu_si128((const __m128i *)sc)),
                                      sc_hi = _mm512_cvtepi8_epi32(
                                          _mm_loadu_si128((const __m128i *)(sc + 16)));
                        UNROLL for (int i = 0; i < MT; i++) acc[i][g] =
                            _mm512_add_epi32(_mm512_mullo_epi32(acc[i][g], sc_lo),
                                             _mm512_mullo_epi32(hi_acc[i][g], sc_hi));
                    }
                } else if (kind == KQ_K6) { /* the first half's step, then the second's below */
                    UNROLL for (int g = 0; g < NG; g++) s[g] = scale_lanes(wb[g], sub, false, kind);
                    chain_step(j, f, acc, s, t0, b, MT, NG);
                    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++)
                        acc[i][g] = hi_acc[i][g];
                } else if (split) {
                    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++)
                        acc[i][g] = _mm512_add_epi32(acc[i][g], hi_acc[i][g]);
                }
            }
            /* the block's scales (Q6_K: its second half's) */
            const bool second = kind == KQ_K6;
            UNROLL for (int g = 0; g < NG; g++) s[g] =
                unpacked ? _mm512_loadu_ps(wb[g] + KQ_UNPACKED_SUB * sub + (second ? 576 : 512))
                : kind == KQ_K3 ? d_lanes(wb[g])
                                : scale_lanes(wb[g], sub, second, kind);
            chain_step(j, f, acc, s, t0, b, MT, NG);
        }
    }
    /* then the mins' chain (Q6_K has none) */
    for (int sb = 0; has_mins(kind) && sb < ns; sb++)
        for (int sub = 0; sub < KQ_SUBS; sub++) {
            const int b = sb * KQ_SUBS + sub;
            __m512 m[KQ_NG];
            UNROLL for (int g = 0; g < NG; g++) m[g] =
                unpacked ? _mm512_loadu_ps(lv[g] + (size_t)sb * KQ_UNPACKED_SUPER +
                                           KQ_UNPACKED_SUB * sub + 576)
                         : scale_lanes(j->w + ((size_t)(g0 + g) * ns + sb) * j->group_super, sub,
                                       true, kind);
            UNROLL for (int i = 0; i < MT; i++) {
                const __m512 dx_sum = _mm512_set1_ps(j->dx_sum[(size_t)(t0 + i) * j->nb + b]);
                UNROLL for (int g = 0; g < NG; g++) f[i][g] =
                    _mm512_fnmadd_ps(m[g], dx_sum, f[i][g]);
            }
        }
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) {
        const int r = (g0 + g) * KQ_ROWS, left = j->n_out - r;
        float *dst = j->y + (size_t)(t0 + i) * j->n_out + r;
        if (left >= KQ_ROWS)
            _mm512_storeu_ps(dst, f[i][g]);
        else /* the padded rows of the last group are not stored */
            _mm512_mask_storeu_ps(dst, cake_tail_mask(left), f[i][g]);
    }
}

/* The tile for these sizes, unpacked, or packed of the job's kind. */
CAKE_INLINE void kq_tile_ng(const kq_job *j, const uint8_t *const *lv, int t0, int g0, const int MT,
                            int ng, bool unpacked) {
#define KQ_TILE_NG(UNPACKED, KIND)                                                                 \
    if (ng == 2)                                                                                   \
        kq_tile(j, lv, t0, g0, MT, 2, UNPACKED, KIND);                                             \
    else                                                                                           \
        kq_tile(j, lv, t0, g0, MT, 1, UNPACKED, KIND);
    if (unpacked) { /* unpacked levels are bytes whatever the kind; the scales and
                     * the offsets differ: mins (K4), two halves (K6) or one step (Q40:
                     * Q4_0, IQ4_NL and Q3_K) */
        if (j->kind == KQ_K6) {
            KQ_TILE_NG(true, KQ_K6)
        } else if (has_mins(j->kind)) {
            KQ_TILE_NG(true, KQ_K4)
        } else {
            KQ_TILE_NG(true, KQ_Q40)
        }
    } else {
        switch (j->kind) {
        case KQ_K5:
            KQ_TILE_NG(false, KQ_K5)
            break;
        case KQ_K6:
            KQ_TILE_NG(false, KQ_K6)
            break;
        case KQ_K3:
            KQ_TILE_NG(false, KQ_K3)
            break;
        case KQ_IQ4:
            KQ_TILE_NG(false, KQ_IQ4)
            break;
        case KQ_Q40:
            KQ_TILE_NG(false, KQ_Q40)
            break;
        case KQ_IQ4NL:
            KQ_TILE_NG(false, KQ_IQ4NL)
            break;
        default:
            KQ_TILE_NG(false, KQ_K4)
        }
    }
#undef KQ_TILE_NG
}

/* Tokens per packed tile (batches of 2-15). Sanitizer builds take them one
 * at a time (the same bits): compiling the tile for every kind, size and
 * layout took ASan + UBSan 5 minutes. */
#ifdef CAKE_SANITIZED
#define KQ_PACKED_MT 1
#else
#define KQ_PACKED_MT KQ_MT
#endif

CAKE_INLINE void kq_tile_any(const kq_job *j, const uint8_t *const *lv, int t0, int g0, int mt,
                             int ng, bool unpacked) {
    if (KQ_PACKED_MT == 1) { /* (constants: the switch below is for unpacked tiles only) */
        if (!unpacked) {
            kq_tile_ng(j, lv, t0, g0, 1, ng, false);
            return;
        }
        unpacked = true;
    }
    switch (mt) {
    case 6:
        kq_tile_ng(j, lv, t0, g0, 6, ng, unpacked);
        break;
    case 5:
        kq_tile_ng(j, lv, t0, g0, 5, ng, unpacked);
        break;
    case 4:
        kq_tile_ng(j, lv, t0, g0, 4, ng, unpacked);
        break;
    case 3:
        kq_tile_ng(j, lv, t0, g0, 3, ng, unpacked);
        break;
    case 2:
        kq_tile_ng(j, lv, t0, g0, 2, ng, unpacked);
        break;
    default:
        kq_tile_ng(j, lv, t0, g0, 1, ng, unpacked);
        break;
    }
}

/* A task: KQ_TASK_GROUPS row groups for every token, a tile at a time. A
 * batch of KQ_UNPACK_MIN_TOKENS or more first unpacks the task's blocks in
 * the thread's panel (64 rows x n_in bytes of levels plus f32 scales and
 * mins, 640 KiB at n_in 8192, about the Q8_0 kernel's panel, so it stays in
 * L2): the levels are then taken apart once per task instead of once per
 * tile of 6 tokens, and the tiles run the Q8_0 kernel's inner loop. */
static void kq_task(void *ctx, int task, int tid) {
    const kq_job *j = ctx;
    const int n_groups = (j->n_out + KQ_ROWS - 1) / KQ_ROWS;
    const int g0 = task * KQ_TASK_GROUPS;
    const int g1 = g0 + KQ_TASK_GROUPS < n_groups ? g0 + KQ_TASK_GROUPS : n_groups;
    const uint8_t *lv[KQ_TASK_GROUPS] = {NULL};
    const bool unpacked = j->panels != NULL;
    if (unpacked) {
        const size_t group_bytes = (size_t)j->ns * KQ_UNPACKED_SUPER;
        uint8_t *panel = j->panels + (size_t)tid * KQ_TASK_GROUPS * group_bytes;
        for (int g = g0; g < g1; g++) {
            uint8_t *dst = panel + (size_t)(g - g0) * group_bytes;
            for (int sb = 0; sb < j->ns; sb++)
                unpack_block(dst + (size_t)sb * KQ_UNPACKED_SUPER,
                             j->w + ((size_t)g * j->ns + sb) * j->group_super, j->kind);
            lv[g - g0] = dst;
        }
    }
    const int per_tile = unpacked ? KQ_MT : KQ_PACKED_MT;
    for (int t0 = 0; t0 < j->T; t0 += per_tile) {
        const int mt = j->T - t0 < per_tile ? j->T - t0 : per_tile;
        for (int g = g0; g < g1; g += KQ_NG)
            kq_tile_any(j, lv + (g - g0), t0, g, mt, g1 - g < KQ_NG ? 1 : KQ_NG, unpacked);
    }
}

#else /* no VNNI: the scalar twin, in tasks of rows */

static void kq_task(void *ctx, int task, int tid) {
    (void)tid;
    const kq_job *j = ctx;
    const int r0 = task * KQ_TASK_GROUPS * KQ_ROWS;
    const int r1 =
        r0 + KQ_TASK_GROUPS * KQ_ROWS < j->n_out ? r0 + KQ_TASK_GROUPS * KQ_ROWS : j->n_out;
    lanes_rows(j->x16_dtype, j->y, j->x, j->w, j->T, j->n_in, j->n_out, r0, r1);
}

#endif

void cake_matmul_kquant(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                        int n_in, int n_out, cake_threadpool *pool) {
    kq_job j = {.y = y,
                .x = x,
                .w = w,
                .x16_dtype = x16_dtype,
                .kind = kind_of(x16_dtype),
                .group_super = group_super(x16_dtype),
                .T = n_tokens,
                .n_in = n_in,
                .n_out = n_out,
                .nb = n_in / CAKE_Q8_0_BLOCK,
                .ns = n_in / KQ_SUPER};
    const int n_tasks = (n_out + KQ_TASK_GROUPS * KQ_ROWS - 1) / (KQ_TASK_GROUPS * KQ_ROWS);
#ifdef KQ_VNNI
    if (cake_q8_acts_make(&j.a, x, n_tokens, n_in, pool)) {
        /* out of memory: the scalar twin needs no buffer and gives the same bits */
        cake_matmul_kquant_lanes(x16_dtype, y, x, w, n_tokens, n_in, n_out);
        return;
    }
    const size_t nblk = (size_t)n_tokens * j.nb;
    if (has_mins(j.kind))
        j.dx_sum = malloc(nblk * sizeof(float));
    else
        j.acc0 = malloc(nblk * 2 * sizeof(int32_t));
    if (!j.dx_sum && !j.acc0) {
        cake_q8_acts_free(&j.a);
        cake_matmul_kquant_lanes(x16_dtype, y, x, w, n_tokens, n_in, n_out);
        return;
    }
    /* the panels (without them, the levels are read packed: the same bits) */
    if (n_tokens >= KQ_UNPACK_MIN_TOKENS)
        j.panels = aligned_alloc(64, (size_t)cake_threadpool_size(pool) * KQ_TASK_GROUPS *
                                         (size_t)j.ns * KQ_UNPACKED_SUPER);
    for (size_t i = 0; j.dx_sum && i < nblk; i++) j.dx_sum[i] = j.a.d[i] * (float)(j.a.c[i] / 128);
    /* Q3_K unpacked: 128 - (q - 4) sc as a block's levels (unpack_block) */
    const bool q3_unpacked = j.kind == KQ_K3 && j.panels;
    const int off = q3_unpacked ? 128 : level_offset(j.kind);
    for (size_t i = 0; j.acc0 && i < nblk; i++) {
        int32_t first = j.a.c[i] / 128, second = 0; /* c: 128 x the block's sum of q */
        if (per_16(j.kind) && !q3_unpacked) {
            first = 0;
            for (int k = 0; k < 16; k++) first += j.a.q[i * CAKE_Q8_0_BLOCK + (size_t)k];
            second = j.a.c[i] / 128 - first;
        }
        j.acc0[2 * i] = -off * first;
        j.acc0[2 * i + 1] = -off * second;
    }
    cake_threadpool_run(pool, n_tasks, kq_task, &j);
    free(j.panels);
    free(j.dx_sum);
    free(j.acc0);
    cake_q8_acts_free(&j.a);
#else
    cake_threadpool_run(pool, n_tasks, kq_task, &j);
#endif
}
