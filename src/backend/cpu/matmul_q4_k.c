/* The CPU matmul for Q4_K weights, in the file's 4.5 bits a weight instead
 * of a Q8_0 copy (8.5): the integer kernel of matmul_q8_0.c with 4-bit
 * weights.
 *
 * A Q4_K block is 256 values in 8 sub-blocks of 32; value k of sub-block j
 * is s_j q_k - m_j with q_k in 0..15, s_j = d sc_j and m_j = dmin mn_j (d,
 * dmin f16; sc_j, mn_j 6-bit; both products exact in f32). Activations are
 * quantized per block of 32 as for Q8_0 (cake_q8_acts: dx, qx), so a
 * sub-block contributes
 *     s_j dx isum - m_j dx sum qx,   isum = sum q_k qx_k, exact integers,
 * and each output is one chain over the blocks b = 0, 1, ... of
 *     y = fma((float)isum_b, s_b * dx_b, y);  y = fma(-(m_b * dx_b), sum qx_b, y)
 * (products rounded to f32 first), so, as for Q8_0, a token's row is the
 * same bits whatever the batch, tiles and threads, and the scalar twin below
 * gives the same bits. No weight is rounded: the result differs from the
 * exact one only by the activations' rounding (the Q8_0 copy this replaces
 * also rounded every weight to 8 bits).
 *
 * CAKE_DTYPE_Q4_K_X16, made once from the file's blocks (cake_q4_k_pack_x16):
 * rows in groups of 16 (the last padded with zero rows), and per group and
 * block of 256 columns Q4K_GROUP_SUPER = 2368 bytes, 4.625 bits a weight:
 *     16 f16 d, then 16 f16 dmin (64 bytes);
 *     per sub-block j = 0..7: 16 sc_j, then 16 mn_j (one byte each);
 *     per sub-block j: for p = 0..3, for row i = 0..15, 4 bytes k = 0..3:
 *         low nibble q[i][32 j + 4 p + k], high nibble q[i][32 j + 16 + 4 p + k].
 * One 64-byte load holds 4 consecutive weights of 16 rows twice over: its
 * low nibbles (AND 0x0F) and its high ones (shift, AND) are two operands of
 * vpdpbusd with the rows in the lanes, as in the Q8_0 kernel, and the levels
 * are unsigned already (no +128 to take off). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "model/dequant.h"

#if defined(CAKE_AVX512) && defined(__AVX512VNNI__)
#define Q4_VNNI 1
#endif

enum {
    Q4K_ROWS = 16,                               /* rows per group: the lanes */
    Q4K_SUPER = 256,                             /* columns per Q4_K block */
    Q4K_SUBS = 8,                                /* sub-blocks of 32 per block */
    Q4K_BLOCK_BYTES = 144,                       /* a Q4_K block in the file */
    Q4K_SCOFF = 64,                              /* the scales after the 16 d and 16 dmin */
    Q4K_QOFF = Q4K_SCOFF + Q4K_SUBS * 32,        /* the levels after the scales: 320 */
    Q4K_GROUP_SUPER = Q4K_QOFF + Q4K_SUBS * 256, /* 2368 bytes */
    Q4K_MT = 6,                                  /* tokens per register tile */
    Q4K_NG = 2,                                  /* row groups per register tile */
    Q4K_TASK_GROUPS = 4,                         /* row groups per task (64 rows) */
};

size_t cake_q4_k_x16_size(int n_out, int n_in) {
    return (size_t)((n_out + Q4K_ROWS - 1) / Q4K_ROWS) * (size_t)(n_in / Q4K_SUPER) *
           Q4K_GROUP_SUPER;
}

void cake_q4_k_pack_x16(void *dst, const void *q4_k, int n_out, int n_in) {
    const int ns = n_in / Q4K_SUPER, ng = (n_out + Q4K_ROWS - 1) / Q4K_ROWS;
    uint8_t *d = dst;
    for (int g = 0; g < ng; g++)
        for (int sb = 0; sb < ns; sb++, d += Q4K_GROUP_SUPER) {
            memset(d, 0, Q4K_GROUP_SUPER); /* padding rows: scales 0, levels 0 */
            for (int i = 0; i < Q4K_ROWS && g * Q4K_ROWS + i < n_out; i++) {
                const uint8_t *blk =
                    (const uint8_t *)q4_k +
                    ((size_t)(g * Q4K_ROWS + i) * ns + (size_t)sb) * Q4K_BLOCK_BYTES;
                uint16_t dd, dm;
                uint8_t sc[8], mn[8], q[256];
                cake_q4_k_unpack(blk, &dd, &dm, sc, mn, q);
                memcpy(d + 2 * i, &dd, 2);
                memcpy(d + 32 + 2 * i, &dm, 2);
                for (int j = 0; j < Q4K_SUBS; j++) {
                    d[Q4K_SCOFF + 32 * j + i] = sc[j];
                    d[Q4K_SCOFF + 32 * j + 16 + i] = mn[j];
                    for (int p = 0; p < 4; p++)
                        for (int k = 0; k < 4; k++)
                            d[Q4K_QOFF + 256 * j + 64 * p + 4 * i + k] =
                                (uint8_t)(q[32 * j + 4 * p + k] | q[32 * j + 16 + 4 * p + k] << 4);
                }
            }
        }
}

/* Row r of a CAKE_DTYPE_Q4_K_X16 matrix with ns blocks of 256 per row: the
 * group-block holding column k, its level q at k, and the scale s and min m
 * of the sub-block of 32 holding k. */
static const uint8_t *group_block(const void *w, size_t ns, size_t r, size_t k) {
    return (const uint8_t *)w + ((r / Q4K_ROWS) * ns + k / Q4K_SUPER) * Q4K_GROUP_SUPER;
}

int cake_q4_k_x16_level(const void *w, size_t ns, size_t r, size_t k) {
    const size_t e = k % Q4K_SUPER, j = e / 32, c = e % 32;
    const uint8_t b = group_block(
        w, ns, r, k)[Q4K_QOFF + 256 * j + 64 * (c % 16 / 4) + 4 * (r % Q4K_ROWS) + c % 4];
    return c < 16 ? b & 0xF : b >> 4;
}

static float f16_at(const uint8_t *p) {
    cake_f16 h;
    memcpy(&h, p, 2);
    return cake_f16_to_f32(h);
}

float cake_q4_k_x16_scale(const void *w, size_t ns, size_t r, size_t k) {
    const uint8_t *gb = group_block(w, ns, r, k);
    const size_t i = r % Q4K_ROWS, j = k % Q4K_SUPER / 32;
    return (float)gb[Q4K_SCOFF + 32 * j + i] * f16_at(gb + 2 * i);
}

float cake_q4_k_x16_min(const void *w, size_t ns, size_t r, size_t k) {
    const uint8_t *gb = group_block(w, ns, r, k);
    const size_t i = r % Q4K_ROWS, j = k % Q4K_SUPER / 32;
    return (float)gb[Q4K_SCOFF + 32 * j + 16 + i] * f16_at(gb + 32 + i * 2);
}

/* ===================== reference and scalar twin ===================== */

int cake_matmul_q4_k_ref(float *y, const float *x, const void *w, int n_tokens, int n_in,
                         int n_out) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / Q4K_SUPER;
    for (int t = 0; t < n_tokens; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0.0;
            for (int b = 0; b < nb; b++) {
                int8_t q[CAKE_Q8_0_BLOCK];
                float dx;
                int32_t c;
                cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q,
                                             &dx, &c);
                long isum = 0;
                for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                    isum += (long)cake_q4_k_x16_level(w, ns, n, b * CAKE_Q8_0_BLOCK + k) * q[k];
                const size_t k0 = (size_t)b * CAKE_Q8_0_BLOCK;
                s += (double)dx * ((double)cake_q4_k_x16_scale(w, ns, n, k0) * (double)isum -
                                   (double)cake_q4_k_x16_min(w, ns, n, k0) * (double)(c / 128));
            }
            y[(size_t)t * n_out + n] = (float)s;
        }
    return 0;
}

/* Rows [r0, r1) of every token in the kernel's order. */
static void lanes_rows_q4(float *y, const float *x, const uint8_t *w, int n_tokens, int n_in,
                          int n_out, int r0, int r1) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / Q4K_SUPER;
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
                int isum = 0;
                for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                    isum += cake_q4_k_x16_level(w, ns, n, k0 + k) * q[k];
                yt[n] = fmaf((float)isum, cake_q4_k_x16_scale(w, ns, n, k0) * dx, yt[n]);
            }
        }
        for (int b = 0; b < nb; b++) { /* then the mins' */
            int8_t q[CAKE_Q8_0_BLOCK];
            float dx;
            int32_t c;
            cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q, &dx,
                                         &c);
            const float dx_sum = dx * (float)(c / 128);
            for (int n = r0; n < r1; n++)
                yt[n] =
                    fmaf(-cake_q4_k_x16_min(w, ns, n, (size_t)b * CAKE_Q8_0_BLOCK), dx_sum, yt[n]);
        }
    }
}

void cake_matmul_q4_k_lanes(float *y, const float *x, const void *w, int n_tokens, int n_in,
                            int n_out) {
    lanes_rows_q4(y, x, w, n_tokens, n_in, n_out, 0, n_out);
}

/* ===================== the threaded kernel ===================== */

typedef struct {
    float *y;
    const float *x;
    const uint8_t *w;
    int T, n_in, n_out, nb, ns;
    cake_q8_acts a;
    float *dx_sum;   /* (T, nb) each block's scale times its sum of q: the mins' factor */
    uint8_t *panels; /* NULL, or per thread one task's levels as bytes (Q4K_PANEL_BYTES a group) */
} q4_job;

#ifdef Q4_VNNI

#define UNROLL _Pragma("GCC unroll 8")

/* A batch of at least this many tokens unpacks each task's levels to bytes
 * first (below); fewer read the nibbles where they are. */
#define Q4K_UNPACK_MIN_TOKENS 16

/* The 16 rows' scales s = d sc and mins m = dmin mn of sub-block `sub` of
 * group-block gb, as f32 lanes. */
CAKE_INLINE void scales_of(const uint8_t *gb, int sub, __m512 *s, __m512 *m) {
    const uint8_t *sc = gb + Q4K_SCOFF + 32 * sub;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb)),
                 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb + 32)));
    *s = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc))), d);
    *m = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16)))),
        dmin);
}

/* One group's block of 256 unpacked: per sub-block 8 steps of 64 bytes (4
 * consecutive levels of each of the 16 rows, as the Q8_0 layout has them,
 * less its +128), then the 16 scales and the 16 mins as f32. */
enum { Q4K_UNPACKED_SUB = 8 * 64 + 2 * 64, Q4K_UNPACKED_SUPER = Q4K_SUBS * Q4K_UNPACKED_SUB };

static void unpack_block(uint8_t *dst, const uint8_t *gb) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int sub = 0; sub < Q4K_SUBS; sub++, dst += Q4K_UNPACKED_SUB) {
        for (int p = 0; p < 4; p++) {
            const __m512i v = _mm512_loadu_si512(gb + Q4K_QOFF + 256 * sub + 64 * p);
            _mm512_storeu_si512(dst + 64 * p, _mm512_and_si512(v, low4));
            _mm512_storeu_si512(dst + 64 * (p + 4),
                                _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
        }
        __m512 s, m;
        scales_of(gb, sub, &s, &m);
        _mm512_storeu_ps(dst + 512, s);
        _mm512_storeu_ps(dst + 576, m);
    }
}

/* MT tokens (t0..) x NG row groups (g0..): per sub-block 8 vpdpbusd steps
 * per token, then each lane's chain takes its two FMAs. The levels come
 * from lv[g] (unpacked: a group's bytes, block after block) or from the
 * packed nibbles: 4 loads of 64 bytes, each 2 steps (low, then high
 * nibbles); one token (decode) then puts the high-nibble steps in a second
 * accumulator, added at the end (integers: the same bits, two dependency
 * chains instead of one). */
CAKE_INLINE void q4_tile(const q4_job *j, const uint8_t *const *lv, int t0, int g0, const int MT,
                         const int NG, const bool unpacked) {
    const int ns = j->ns, nb = j->nb, n_in = j->n_in;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 f[Q4K_MT][Q4K_NG];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) f[i][g] =
        _mm512_setzero_ps();
    for (int sb = 0; sb < ns; sb++) {
        const uint8_t *wb[Q4K_NG];
        UNROLL for (int g = 0; g < NG; g++) wb[g] =
            unpacked ? lv[g] + (size_t)sb * Q4K_UNPACKED_SUPER
                     : j->w + ((size_t)(g0 + g) * ns + sb) * Q4K_GROUP_SUPER;
        for (int sub = 0; sub < Q4K_SUBS; sub++) {
            const int b = sb * Q4K_SUBS + sub;
            __m512i acc[Q4K_MT][Q4K_NG], hi_acc[Q4K_NG];
            UNROLL for (int g = 0; g < NG; g++) hi_acc[g] = _mm512_setzero_si512();
            UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) acc[i][g] =
                _mm512_setzero_si512();
            const int8_t *xb = j->a.q + (size_t)t0 * n_in + (size_t)b * CAKE_Q8_0_BLOCK;
            if (unpacked) {
                UNROLL for (int st = 0; st < 8; st++) {
                    __m512i wv[Q4K_NG];
                    UNROLL for (int g = 0; g < NG; g++) wv[g] =
                        _mm512_loadu_si512(wb[g] + Q4K_UNPACKED_SUB * sub + 64 * st);
                    UNROLL for (int i = 0; i < MT; i++) {
                        int32_t four;
                        memcpy(&four, xb + (size_t)i * n_in + 4 * st, 4);
                        const __m512i xv = _mm512_set1_epi32(four);
                        UNROLL for (int g = 0; g < NG; g++) acc[i][g] =
                            _mm512_dpbusd_epi32(acc[i][g], wv[g], xv);
                    }
                }
            } else {
                UNROLL for (int p = 0; p < 4; p++) {
                    __m512i lo[Q4K_NG], hi[Q4K_NG];
                    UNROLL for (int g = 0; g < NG; g++) {
                        const __m512i v = _mm512_loadu_si512(wb[g] + Q4K_QOFF + 256 * sub + 64 * p);
                        lo[g] = _mm512_and_si512(v, low4);
                        hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    }
                    UNROLL for (int i = 0; i < MT; i++) {
                        int32_t x_lo, x_hi;
                        memcpy(&x_lo, xb + (size_t)i * n_in + 4 * p, 4);
                        memcpy(&x_hi, xb + (size_t)i * n_in + 16 + 4 * p, 4);
                        const __m512i vlo = _mm512_set1_epi32(x_lo), vhi = _mm512_set1_epi32(x_hi);
                        UNROLL for (int g = 0; g < NG; g++) {
                            acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], lo[g], vlo);
                            if (MT == 1)
                                hi_acc[g] = _mm512_dpbusd_epi32(hi_acc[g], hi[g], vhi);
                            else
                                acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], hi[g], vhi);
                        }
                    }
                }
                if (MT == 1)
                    UNROLL for (int g = 0; g < NG; g++) acc[0][g] =
                        _mm512_add_epi32(acc[0][g], hi_acc[g]);
            }
            __m512 s[Q4K_NG], m_unused;
            UNROLL for (int g = 0; g < NG; g++) {
                if (unpacked)
                    s[g] = _mm512_loadu_ps(wb[g] + Q4K_UNPACKED_SUB * sub + 512);
                else
                    scales_of(wb[g], sub, &s[g], &m_unused);
            }
            UNROLL for (int i = 0; i < MT; i++) {
                const __m512 dx = _mm512_set1_ps(j->a.d[(size_t)(t0 + i) * nb + b]);
                UNROLL for (int g = 0; g < NG; g++) f[i][g] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(acc[i][g]), _mm512_mul_ps(s[g], dx), f[i][g]);
            }
        }
    }
    /* then the mins' chain */
    for (int sb = 0; sb < ns; sb++)
        for (int sub = 0; sub < Q4K_SUBS; sub++) {
            const int b = sb * Q4K_SUBS + sub;
            __m512 m[Q4K_NG];
            UNROLL for (int g = 0; g < NG; g++) {
                if (unpacked) {
                    m[g] = _mm512_loadu_ps(lv[g] + (size_t)sb * Q4K_UNPACKED_SUPER +
                                           Q4K_UNPACKED_SUB * sub + 576);
                } else {
                    __m512 s_unused;
                    scales_of(j->w + ((size_t)(g0 + g) * ns + sb) * Q4K_GROUP_SUPER, sub, &s_unused,
                              &m[g]);
                }
            }
            UNROLL for (int i = 0; i < MT; i++) {
                const __m512 dx_sum = _mm512_set1_ps(j->dx_sum[(size_t)(t0 + i) * nb + b]);
                UNROLL for (int g = 0; g < NG; g++) f[i][g] =
                    _mm512_fnmadd_ps(m[g], dx_sum, f[i][g]);
            }
        }
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) {
        const int r = (g0 + g) * Q4K_ROWS, left = j->n_out - r;
        float *dst = j->y + (size_t)(t0 + i) * j->n_out + r;
        if (left >= Q4K_ROWS)
            _mm512_storeu_ps(dst, f[i][g]);
        else /* the padded rows of the last group are not stored */
            _mm512_mask_storeu_ps(dst, cake_tail_mask(left), f[i][g]);
    }
}

CAKE_INLINE void q4_tile_any(const q4_job *j, const uint8_t *const *lv, int t0, int g0, int mt,
                             int ng, bool unpacked) {
#define Q4_TILE_NG(MT)                                                                             \
    if (ng == 2 && unpacked)                                                                       \
        q4_tile(j, lv, t0, g0, MT, 2, true);                                                       \
    else if (ng == 2)                                                                              \
        q4_tile(j, lv, t0, g0, MT, 2, false);                                                      \
    else if (unpacked)                                                                             \
        q4_tile(j, lv, t0, g0, MT, 1, true);                                                       \
    else                                                                                           \
        q4_tile(j, lv, t0, g0, MT, 1, false);
    switch (mt) {
    case 6:
        Q4_TILE_NG(6)
        break;
    case 5:
        Q4_TILE_NG(5)
        break;
    case 4:
        Q4_TILE_NG(4)
        break;
    case 3:
        Q4_TILE_NG(3)
        break;
    case 2:
        Q4_TILE_NG(2)
        break;
    default:
        Q4_TILE_NG(1)
        break;
    }
#undef Q4_TILE_NG
}

/* A task: Q4K_TASK_GROUPS row groups for every token, a tile at a time. A
 * batch of Q4K_UNPACK_MIN_TOKENS or more first unpacks the task's levels to
 * bytes in the thread's panel (64 rows x n_in bytes, 512 KiB at n_in 8192,
 * the size of the Q8_0 kernel's panels, so it stays in L2): the nibbles are
 * then split once per task instead of once per tile of 6 tokens (llama-1b
 * shapes, 512 tokens: ~335 -> ~ GOP/s). */
static void q4_task(void *ctx, int task, int tid) {
    const q4_job *j = ctx;
    const int n_groups = (j->n_out + Q4K_ROWS - 1) / Q4K_ROWS;
    const int g0 = task * Q4K_TASK_GROUPS;
    const int g1 = g0 + Q4K_TASK_GROUPS < n_groups ? g0 + Q4K_TASK_GROUPS : n_groups;
    const uint8_t *lv[Q4K_TASK_GROUPS] = {NULL};
    const bool unpacked = j->panels != NULL;
    if (unpacked) {
        const size_t group_bytes = (size_t)j->ns * Q4K_UNPACKED_SUPER;
        uint8_t *panel = j->panels + (size_t)tid * Q4K_TASK_GROUPS * group_bytes;
        for (int g = g0; g < g1; g++) {
            uint8_t *dst = panel + (size_t)(g - g0) * group_bytes;
            for (int sb = 0; sb < j->ns; sb++)
                unpack_block(dst + (size_t)sb * Q4K_UNPACKED_SUPER,
                             j->w + ((size_t)g * j->ns + sb) * Q4K_GROUP_SUPER);
            lv[g - g0] = dst;
        }
    }
    for (int t0 = 0; t0 < j->T; t0 += Q4K_MT) {
        const int mt = j->T - t0 < Q4K_MT ? j->T - t0 : Q4K_MT;
        for (int g = g0; g < g1; g += Q4K_NG)
            q4_tile_any(j, lv + (g - g0), t0, g, mt, g1 - g < Q4K_NG ? 1 : Q4K_NG, unpacked);
    }
}

#else /* no VNNI: the scalar twin, in tasks of rows */

static void q4_task(void *ctx, int task, int tid) {
    (void)tid;
    const q4_job *j = ctx;
    const int r0 = task * Q4K_TASK_GROUPS * Q4K_ROWS;
    const int r1 =
        r0 + Q4K_TASK_GROUPS * Q4K_ROWS < j->n_out ? r0 + Q4K_TASK_GROUPS * Q4K_ROWS : j->n_out;
    lanes_rows_q4(j->y, j->x, j->w, j->T, j->n_in, j->n_out, r0, r1);
}

#endif

void cake_matmul_q4_k(float *y, const float *x, const void *w, int n_tokens, int n_in, int n_out,
                      cake_threadpool *pool) {
    q4_job j = {.y = y,
                .x = x,
                .w = w,
                .T = n_tokens,
                .n_in = n_in,
                .n_out = n_out,
                .nb = n_in / CAKE_Q8_0_BLOCK,
                .ns = n_in / Q4K_SUPER};
    const int n_tasks = (n_out + Q4K_TASK_GROUPS * Q4K_ROWS - 1) / (Q4K_TASK_GROUPS * Q4K_ROWS);
#ifdef Q4_VNNI
    if (cake_q8_acts_make(&j.a, x, n_tokens, n_in, pool)) {
        /* out of memory: the scalar twin needs no buffer and gives the same bits */
        cake_matmul_q4_k_lanes(y, x, w, n_tokens, n_in, n_out);
        return;
    }
    const size_t nblk = (size_t)n_tokens * j.nb;
    j.dx_sum = malloc(nblk * sizeof(float));
    if (!j.dx_sum) {
        cake_q8_acts_free(&j.a);
        cake_matmul_q4_k_lanes(y, x, w, n_tokens, n_in, n_out);
        return;
    }
    for (size_t i = 0; i < nblk; i++) j.dx_sum[i] = j.a.d[i] * (float)(j.a.c[i] / 128);
    /* the panels (without them, the nibbles are read in place: the same bits) */
    if (n_tokens >= Q4K_UNPACK_MIN_TOKENS)
        j.panels = aligned_alloc(64, (size_t)cake_threadpool_size(pool) * Q4K_TASK_GROUPS *
                                         (size_t)j.ns * Q4K_UNPACKED_SUPER);
    cake_threadpool_run(pool, n_tasks, q4_task, &j);
    free(j.panels);
    free(j.dx_sum);
    cake_q8_acts_free(&j.a);
#else
    cake_threadpool_run(pool, n_tasks, q4_task, &j);
#endif
}
